"""Writes the fuzz targets' seed corpus (tests/fuzz/corpus/): a few tiny .npy and .safetensors files,
valid and not, each reaching a different part of the readers. Run it again after changing a seed."""
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent


def npy(header, data, version=1):
    h = header.encode("latin1")
    size = struct.pack("<H", len(h)) if version == 1 else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes([version, 0]) + size + h + data


def npy_v1(d, data):
    pad = 64 - (10 + len(d) + 1) % 64
    return npy(d + " " * pad + "\n", data)


def st(header, data):
    h = header.encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def entry(dtype, shape, begin, end):
    return '{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}' % (dtype, shape, begin, end)


NPY = {
    "f32_2d": npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", bytes(range(24))),
    "f16_1d": npy_v1("{'descr': '<f2', 'fortran_order': False, 'shape': (5,), }", bytes(range(10))),
    "v2_any_order": npy('{"shape":(1,2),"fortran_order" : False,\t"descr":"=f4"}\n', bytes(8), 2),
    "v3_empty": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 8), }  \n", b"", 3),
    "bad_leading_zero": npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (04,), }", bytes(16)),
    "bad_big_endian": npy_v1("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", bytes(4)),
}

W = entry("F32", "[2,2]", 0, 16)
ST = {
    "f32_w": st('{"w":%s}' % W, bytes(range(16))),
    "bf16_metadata": st('{"__metadata__":{"format":"pt"},"w":%s}' % entry("BF16", "[3]", 0, 6), bytes(6)),
    "mixed_dtypes": st('{"ids":%s,"w":%s,"m":%s,"q":%s}' % (entry("I64", "[2]", 0, 16), entry("F16", "[1,4]", 16, 24),
                                                           entry("BOOL", "[3]", 24, 27), entry("F4", "[2]", 27, 28)),
                       bytes(28)),
    "escapes_unknown_fields": st(' {"\\u0077":{"x":[1.5e3,-0,true,null,{"k":"\\ud83d\\ude00"}],"dtype":"F\\u00332",'
                                 '"shape":[1],"data_offsets":[0,4]},"__metadata__":null}\n', bytes(4)),
    "empty_tensors": st('{"z":%s,"w":%s,"e":%s}' % (entry("U8", "[0,18446744073709551615]", 0, 0), W,
                                                    entry("F32", "[0]", 16, 16)), bytes(16)),
    "bad_gap": st('{"w":%s,"b":%s}' % (entry("F32", "[1]", 0, 4), entry("U8", "[4]", 8, 12)), bytes(12)),
    "bad_duplicate": st('{"w":%s,"w":%s}' % (W, W), bytes(16)),
}

for sub, files, ext in (("npy", NPY, ".npy"), ("safetensors", ST, ".safetensors")):
    d = HERE / "corpus" / sub
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / (name + ext)).write_bytes(data)
