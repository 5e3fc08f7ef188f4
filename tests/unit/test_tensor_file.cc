// Tensor files (.npy, .safetensors): round trips, bytes as numpy writes them, the atomic save, and
// malformed files, each of which must be refused with a one-line message and nothing leaked.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "scratch_dir.h"
#include "tensor_file.h"

namespace {

namespace fs = std::filesystem;
using Bytes = std::string;

Bytes U16(uint32_t v) { return Bytes{char(v & 0xff), char((v >> 8) & 0xff)}; }
Bytes U32(uint32_t v) { return U16(v & 0xffff) + U16(v >> 16); }
Bytes U64(uint64_t v) { return U32(uint32_t(v)) + U32(uint32_t(v >> 32)); }

const Bytes kMagic("\x93NUMPY", 6);

// A .npy file of any version with exactly this header text (no padding added).
Bytes NpyRaw(int major, const Bytes &header, const Bytes &data) {
  Bytes pre = kMagic + char(major) + '\0';
  pre += major == 1 ? U16(uint32_t(header.size())) : U32(uint32_t(header.size()));
  return pre + header + data;
}

// A version 1.0 .npy padded the way numpy pads: spaces and '\n' up to a multiple of align (64 since
// numpy 1.14, 16 before), a whole align when already aligned.
Bytes NpyV1(const Bytes &dict, const Bytes &data, size_t align = 64) {
  size_t pad = align - (10 + dict.size() + 1) % align;
  return NpyRaw(1, dict + Bytes(pad, ' ') + "\n", data);
}

Bytes NpyDict(const char *descr, const char *shape, const char *fortran = "False") {
  return Bytes("{'descr': '") + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }";
}

Bytes St(const Bytes &json, const Bytes &data) { return U64(json.size()) + json + data; }

Bytes StEntry(const char *dtype, const char *shape, const char *offsets) {
  return Bytes("{\"dtype\":\"") + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

Bytes Pattern(size_t n, unsigned seed = 11) {
  Bytes b(n, '\0');
  for (size_t i = 0; i < n; i++) b[i] = char((i * 37 + seed) & 0xff);
  return b;
}

class TensorFileTest : public tnorm_test::ScratchDirTest {};

void ExpectOneLine(const char *err) {
  EXPECT_NE(err[0], '\0');
  EXPECT_EQ(std::strchr(err, '\n'), nullptr) << err;
  EXPECT_EQ(std::strchr(err, '\r'), nullptr) << err;
}

bool IsZeroed(const tn_file_tensor &t) {
  tn_file_tensor zero;
  std::memset(&zero, 0, sizeof zero);
  return std::memcmp(&t, &zero, sizeof t) == 0;
}

// ------------------------------------------------------------------------------------------------
// Round trips
// ------------------------------------------------------------------------------------------------

class TensorFileRoundTrip : public TensorFileTest {
 protected:
  void Check(const std::string &file, const std::string &tail, tn_dtype dtype, int ndim, int64_t rows,
             int64_t dim) {
    SCOPED_TRACE(file + tail);
    Bytes data = Pattern(size_t(rows * dim) * tn_dtype_size(dtype));
    tn_file_tensor t;
    std::memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.ndim = ndim;
    t.rows = rows;
    t.dim = dim;
    t.data = data.empty() ? nullptr : &data[0];
    char err[512];
    ASSERT_EQ(tn_file_check_save((Path(file) + tail).c_str(), dtype, err, sizeof err), 0) << err;
    ASSERT_EQ(tn_file_save((Path(file) + tail).c_str(), &t, "tensor", err, sizeof err), 0) << err;
    EXPECT_EQ(List(), std::set<std::string>{file});  // no temporary left behind

    const std::string load =
        Path(file) + (tail.empty() && file.find(".npy") == std::string::npos ? ":tensor" : tail);
    tn_file_tensor got;
    ASSERT_EQ(tn_file_load(load.c_str(), &got, err, sizeof err), 0) << err;
    EXPECT_EQ(got.dtype, dtype);
    EXPECT_EQ(got.ndim, ndim);
    EXPECT_EQ(got.rows, rows);
    EXPECT_EQ(got.dim, dim);
    if (data.empty()) {
      EXPECT_EQ(got.data, nullptr);
    } else {
      ASSERT_NE(got.data, nullptr);
      EXPECT_EQ(Bytes(static_cast<const char *>(got.data), data.size()), data);
    }
    tn_file_tensor_free(&got);
    EXPECT_TRUE(IsZeroed(got));
  }
};

TEST_F(TensorFileRoundTrip, NpyF32TwoD) { Check("a.npy", "", TN_F32, 2, 3, 5); }
TEST_F(TensorFileRoundTrip, NpyF32OneD) { Check("a.npy", "", TN_F32, 1, 1, 7); }
TEST_F(TensorFileRoundTrip, NpyF16TwoD) { Check("a.npy", "", TN_F16, 2, 4, 9); }
TEST_F(TensorFileRoundTrip, NpyF16OneD) { Check("a.npy", "", TN_F16, 1, 1, 3); }
TEST_F(TensorFileRoundTrip, NpyZeroRows) { Check("a.npy", "", TN_F32, 2, 0, 8); }
TEST_F(TensorFileRoundTrip, NpyZeroDim) { Check("a.npy", "", TN_F16, 2, 5, 0); }
TEST_F(TensorFileRoundTrip, NpyLarge) { Check("a.npy", "", TN_F32, 2, 64, 4096); }
TEST_F(TensorFileRoundTrip, SafetensorsF32TwoD) { Check("a.safetensors", ":x", TN_F32, 2, 3, 5); }
TEST_F(TensorFileRoundTrip, SafetensorsF32OneD) { Check("a.safetensors", ":x", TN_F32, 1, 1, 6); }
TEST_F(TensorFileRoundTrip, SafetensorsF16) { Check("a.safetensors", ":x", TN_F16, 2, 2, 7); }
TEST_F(TensorFileRoundTrip, SafetensorsBF16TwoD) { Check("a.safetensors", ":x", TN_BF16, 2, 5, 3); }
TEST_F(TensorFileRoundTrip, SafetensorsBF16OneD) { Check("a.safetensors", ":x", TN_BF16, 1, 1, 11); }
TEST_F(TensorFileRoundTrip, SafetensorsDefaultName) { Check("a.safetensors", "", TN_BF16, 2, 2, 2); }
TEST_F(TensorFileRoundTrip, SafetensorsZeroRows) { Check("a.safetensors", ":x", TN_F32, 2, 0, 4); }
TEST_F(TensorFileRoundTrip, SafetensorsNameWithColonAndQuotes) {
  Check("a.safetensors", ":layer:0/\"w\\\"", TN_F16, 2, 2, 3);
}
TEST_F(TensorFileRoundTrip, SafetensorsNonAsciiName) {
  Check("a.safetensors", ":poids_\xc3\xa9\xf0\x9f\x98\x80", TN_F32, 1, 1, 2);
}
// The storage dtypes of quantized outputs: FP8 and bytes through safetensors, the integers through .npy.
TEST_F(TensorFileRoundTrip, SafetensorsF8E4M3) { Check("a.safetensors", ":q", TN_F8_E4M3, 2, 3, 64); }
TEST_F(TensorFileRoundTrip, SafetensorsF8E5M2) { Check("a.safetensors", ":q", TN_F8_E5M2, 1, 1, 9); }
TEST_F(TensorFileRoundTrip, SafetensorsI8) { Check("a.safetensors", ":q", TN_I8, 2, 4, 5); }
TEST_F(TensorFileRoundTrip, SafetensorsU8) { Check("a.safetensors", ":q", TN_U8, 2, 128, 4); }
TEST_F(TensorFileRoundTrip, NpyI8) { Check("a.npy", "", TN_I8, 2, 3, 7); }
TEST_F(TensorFileRoundTrip, NpyU8) { Check("a.npy", "", TN_U8, 1, 1, 13); }

// Extents beyond 2^53 (no double holds them exactly) are written and read back exactly.
TEST_F(TensorFileRoundTrip, SafetensorsHugeEmptyShapes) {
  Check("a.safetensors", ":x", TN_F32, 2, 0, int64_t(1) << 60);
  Check("a.safetensors", ":x", TN_BF16, 2, (int64_t(1) << 60) + 1, 0);
  Check("a.safetensors", ":x", TN_F16, 2, INT64_MAX, 0);
}

TEST_F(TensorFileRoundTrip, NpyWrittenExactlyAsNumpy) {
  float v[12];
  for (int i = 0; i < 12; i++) v[i] = float(i);
  tn_file_tensor t;
  std::memset(&t, 0, sizeof t);
  t.dtype = TN_F32;
  t.ndim = 2;
  t.rows = 3;
  t.dim = 4;
  t.data = v;
  char err[256];
  ASSERT_EQ(tn_file_save(Path("m.npy").c_str(), &t, nullptr, err, sizeof err), 0) << err;
  // np.save("m.npy", np.arange(12, dtype=np.float32).reshape(3, 4)): a 128-byte preamble + header.
  Bytes dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
  Bytes expect = kMagic + Bytes("\x01\x00\x76\x00", 4) + dict + Bytes(128 - 10 - dict.size() - 1, ' ') + "\n" +
                 Bytes(reinterpret_cast<const char *>(v), sizeof v);
  EXPECT_EQ(Read("m.npy"), expect);

  t.ndim = 1;
  t.rows = 1;
  t.dim = 12;
  ASSERT_EQ(tn_file_save(Path("v.npy").c_str(), &t, nullptr, err, sizeof err), 0) << err;
  Bytes got = Read("v.npy");
  ASSERT_EQ(got.size(), 128u + sizeof v);
  EXPECT_EQ(got.substr(10, 58), "{'descr': '<f4', 'fortran_order': False, 'shape': (12,), }");
}

TEST_F(TensorFileRoundTrip, ReadsFilesAsNumpyWritesThem) {
  Bytes data = Pattern(24);
  struct {
    const char *label;
    Bytes file;
  } files[] = {
      {"numpy 1.x, 64-byte alignment", NpyV1(NpyDict("<f4", "(2, 3)"), data)},
      {"numpy < 1.14, 16-byte alignment", NpyV1(NpyDict("<f4", "(2, 3)"), data, 16)},
      {"numpy >= 1.24, growth spaces", NpyV1(NpyDict("<f4", "(2, 3)") + Bytes(20, ' '), data)},
      {"version 2.0", NpyRaw(2, NpyDict("<f4", "(2, 3)") + "\n", data)},
      {"version 3.0", NpyRaw(3, NpyDict("<f4", "(2, 3)") + "\n", data)},
      {"double quotes, any order, no trailing comma",
       NpyV1("{\"shape\":(2,3),\"fortran_order\" : False,\t\"descr\":\"<f4\"}", data)},
      {"native byte order", NpyV1(NpyDict("=f4", "(2,3,)"), data)},
  };
  for (const auto &f : files) {
    SCOPED_TRACE(f.label);
    Write("n.npy", f.file);
    tn_file_tensor t;
    char err[256];
    ASSERT_EQ(tn_file_load(Path("n.npy").c_str(), &t, err, sizeof err), 0) << err;
    EXPECT_EQ(t.dtype, TN_F32);
    EXPECT_EQ(t.ndim, 2);
    EXPECT_EQ(t.rows, 2);
    EXPECT_EQ(t.dim, 3);
    EXPECT_STREQ(t.name, "");
    EXPECT_EQ(Bytes(static_cast<const char *>(t.data), 24), data);
    tn_file_tensor_free(&t);
  }
}

TEST_F(TensorFileRoundTrip, SafetensorsWithMetadataAndSeveralTensors) {
  Bytes json = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":" + StEntry("F32", "[2]", "[0,8]") +
               ",\"b\":" + StEntry("BF16", "[2,4]", "[8,24]") + ",\"c\":" + StEntry("I64", "[1]", "[24,32]") +
               "}  ";
  Bytes buffer = Pattern(32);
  Write("m.safetensors", St(json, buffer));
  tn_file_tensor t;
  char err[256];
  ASSERT_EQ(tn_file_load((Path("m.safetensors") + ":b").c_str(), &t, err, sizeof err), 0) << err;
  EXPECT_EQ(t.dtype, TN_BF16);
  EXPECT_EQ(t.ndim, 2);
  EXPECT_EQ(t.rows, 2);
  EXPECT_EQ(t.dim, 4);
  EXPECT_STREQ(t.name, "b");
  EXPECT_EQ(Bytes(static_cast<const char *>(t.data), 16), buffer.substr(8, 16));
  tn_file_tensor_free(&t);
  ASSERT_EQ(tn_file_load((Path("m.safetensors") + ":a").c_str(), &t, err, sizeof err), 0) << err;
  EXPECT_EQ(t.ndim, 1);
  EXPECT_EQ(t.rows, 1);
  EXPECT_EQ(t.dim, 2);
  tn_file_tensor_free(&t);
}

TEST_F(TensorFileRoundTrip, SafetensorsHeaderPaddedToEight) {
  for (int len = 1; len <= 9; len++) {
    tn_file_tensor t;
    std::memset(&t, 0, sizeof t);
    Bytes data = Pattern(6);
    t.dtype = TN_F16;
    t.ndim = 1;
    t.rows = 1;
    t.dim = 3;
    t.data = &data[0];
    std::string spec = Path("p.safetensors") + ":" + std::string(size_t(len), 'n');
    char err[256];
    ASSERT_EQ(tn_file_save(spec.c_str(), &t, nullptr, err, sizeof err), 0) << err;
    Bytes got = Read("p.safetensors");
    ASSERT_GE(got.size(), 8u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | uint8_t(got[size_t(i)]);
    EXPECT_EQ(n % 8, 0u);
    ASSERT_EQ(got.size(), 8 + n + 6);
    Bytes json = got.substr(8, n);
    EXPECT_EQ(json.substr(0, json.find_last_not_of(' ') + 1),
              "{\"" + std::string(size_t(len), 'n') + "\":" + StEntry("F16", "[3]", "[0,6]") + "}");
    EXPECT_EQ(got.substr(8 + n), data);
  }
}

// What the reference reader (huggingface/safetensors) accepts is read: each of these files loads 'w'.
TEST_F(TensorFileRoundTrip, SafetensorsReadAsTheReferenceReads) {
  const Bytes w = StEntry("F32", "[2,2]", "[0,16]");
  const Bytes data = Pattern(16);
  struct {
    const char *label;
    Bytes json;
  } files[] = {
      {"JSON whitespace before and after the object", " \t\r\n{\"w\":" + w + "} \t\r\n"},
      {"a name spelled with escapes", "{\"\\u0077\":" + w + "}"},
      {"__metadata__ spelled with escapes", "{\"\\u005f_metadata__\":{\"a\":\"b\"},\"w\":" + w + "}"},
      {"__metadata__ null", "{\"__metadata__\":null,\"w\":" + w + "}"},
      {"__metadata__ with a key twice (the reference keeps the last)",
       "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\\u0000\\ud83d\\ude00\"},\"w\":" + w + "}"},
      {"unknown fields of any JSON, twice too",
       "{\"w\":{\"x\":[1,-0,2.5e-3,1E5,-1.7976931348623157e308,0e99999999999,1e-99999,true,false,null,"
       "{\"k\":[]}],\"dtype\":\"F32\",\"x\":\"\\/\\b\\f\\n\\r\\t\\\"\\\\\",\"shape\":[2,2],\"data_offsets\":[0,16]}}"},
      {"nesting 127 deep", "{\"w\":{\"x\":" + Bytes(125, '[') + Bytes(125, ']') +
                               ",\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}"},
      {"a dtype spelled with escapes",
       "{\"w\":{\"dtype\":\"F\\u00332\",\"shape\":[2,2],\"data_offsets\":[0,16]}}"},
      {"entries in any order, empty ones anywhere",
       "{\"e\":" + StEntry("BF16", "[0,7]", "[16,16]") + ",\"w\":" + w +
           ",\"f\":" + StEntry("U8", "[0]", "[0,0]") +
           ",\"g\":" + StEntry("F64", "[18446744073709551615,0]", "[16,16]") + "}"},
      {"names that are prefixes of others, and the empty name",
       "{\"w\":" + w + ",\"ww\":" + StEntry("U8", "[0]", "[16,16]") + ",\"\":" + StEntry("U8", "[0]", "[0,0]") +
           "}"},
      {"non-ASCII text and DEL", "{\"\xc3\xa9\x7f\":" + StEntry("U8", "[0]", "[0,0]") + ",\"w\":" + w + "}"},
      {"an offset of 2^64-1 in an ignored field",
       "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16],"
       "\"n\":18446744073709551615}}"},
  };
  for (const auto &f : files) {
    SCOPED_TRACE(f.label);
    Write("r.safetensors", St(f.json, data));
    tn_file_tensor t;
    char err[512];
    ASSERT_EQ(tn_file_load(Path("r.safetensors:w").c_str(), &t, err, sizeof err), 0) << err;
    EXPECT_EQ(t.dtype, TN_F32);
    EXPECT_EQ(t.rows, 2);
    EXPECT_EQ(t.dim, 2);
    EXPECT_EQ(Bytes(static_cast<const char *>(t.data), 16), data);
    tn_file_tensor_free(&t);
  }
}

// A file may hold tensors of every dtype the reference knows; only the named one must be F32, F16 or BF16.
TEST_F(TensorFileRoundTrip, SafetensorsWithTensorsOfOtherDtypes) {
  const char *dtypes[][2] = {{"BOOL", "1"},    {"F4", "2"},          {"F6_E2M3", "4"},     {"F6_E3M2", "4"},
                             {"U8", "1"},      {"I8", "1"},          {"F8_E5M2", "1"},     {"F8_E4M3", "1"},
                             {"F8_E8M0", "1"}, {"F8_E4M3FNUZ", "1"}, {"F8_E5M2FNUZ", "1"}, {"I16", "1"},
                             {"U16", "1"},     {"F16", "1"},         {"BF16", "1"},        {"I32", "1"},
                             {"U32", "1"},     {"F32", "1"},         {"C64", "1"},         {"F64", "1"},
                             {"I64", "1"},     {"U64", "1"}};
  const unsigned bits[] = {8, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64};
  Bytes json = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t off = 0;
  for (size_t k = 0; k < sizeof bits / sizeof bits[0]; k++) {
    uint64_t n = std::stoull(dtypes[k][1]) * bits[k] / 8;
    json += ",\"t" + std::to_string(k) + "\":" +
            StEntry(dtypes[k][0], ("[" + std::string(dtypes[k][1]) + "]").c_str(),
                    ("[" + std::to_string(off) + "," + std::to_string(off + n) + "]").c_str());
    off += n;
  }
  json += ",\"w\":" +
          StEntry("BF16", "[3]", ("[" + std::to_string(off) + "," + std::to_string(off + 6) + "]").c_str()) + "}";
  const Bytes data = Pattern(size_t(off) + 6);
  Write("m.safetensors", St(json, data));
  tn_file_tensor t;
  char err[512];
  ASSERT_EQ(tn_file_load(Path("m.safetensors:w").c_str(), &t, err, sizeof err), 0) << err;
  EXPECT_EQ(t.dtype, TN_BF16);
  EXPECT_EQ(t.dim, 3);
  EXPECT_EQ(Bytes(static_cast<const char *>(t.data), 6), data.substr(size_t(off)));
  tn_file_tensor_free(&t);
  ASSERT_EQ(tn_file_load(Path("m.safetensors:t20").c_str(), &t, err, sizeof err), -1);  // I64
  EXPECT_NE(std::strstr(err, "unsupported dtype 'I64'"), nullptr) << err;
}

// Headers numpy reads that are not quite as numpy writes them.
TEST_F(TensorFileRoundTrip, NpyHeadersNumpyAccepts) {
  const Bytes dict = NpyDict("<f4", "(0, 8)");
  const Bytes files[] = {NpyRaw(1, dict, ""), NpyRaw(1, " \t" + dict + " \t\n \n\r\n", ""),
                         NpyRaw(2, dict + Bytes(10000 - dict.size() - 1, ' ') + "\n", "")};
  for (const auto &f : files) {
    Write("z.npy", f);
    tn_file_tensor t;
    char err[256];
    ASSERT_EQ(tn_file_load(Path("z.npy").c_str(), &t, err, sizeof err), 0) << err;
    EXPECT_EQ(t.rows, 0);
    EXPECT_EQ(t.dim, 8);
    tn_file_tensor_free(&t);
  }
}

// A header of tens of MB costs about its own size in memory, whatever it holds: one long array, or a
// great many tensors. The load runs in a child, whose peak RSS starts at its RSS when forked; its time
// is recorded, not asserted (timings belong to benchmarks).
struct LoadCost {
  int rc;
  long grown_kb;
  double seconds;
  char err[256];
};

LoadCost LoadInChild(const std::string &spec) {
  LoadCost cost;
  std::memset(&cost, 0, sizeof cost);
  cost.rc = -2;
  int fds[2];
  if (pipe(fds) != 0) return cost;
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    struct rusage before, after;
    LoadCost c;
    std::memset(&c, 0, sizeof c);
    tn_file_tensor t;
    getrusage(RUSAGE_SELF, &before);
    auto t0 = std::chrono::steady_clock::now();
    c.rc = tn_file_load(spec.c_str(), &t, c.err, sizeof c.err);
    c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    getrusage(RUSAGE_SELF, &after);
    c.grown_kb = after.ru_maxrss - before.ru_maxrss;
    if (write(fds[1], &c, sizeof c) != ssize_t(sizeof c)) _exit(2);
    _exit(0);
  }
  close(fds[1]);
  if (pid > 0 && read(fds[0], &cost, sizeof cost) != ssize_t(sizeof cost)) cost.rc = -2;
  close(fds[0]);
  if (pid > 0) waitpid(pid, nullptr, 0);
  return cost;
}

TEST_F(TensorFileTest, SafetensorsHugeHeadersCostTheirSize) {
  const size_t target = 40u << 20;
  struct {
    const char *label;
    std::string spec;
    const char *expect;  // "" to load
  } cases[] = {{"one long array", "long.safetensors:x", ""},
               {"a long shape", "shape.safetensors:x", "-D; only 1-D and 2-D"},
               {"many tensors", "many.safetensors:t123456", ""}};
  {
    Bytes json = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"pad\":[";
    json.reserve(target + 64);
    while (json.size() < target) json += "0,0,0,0,0,0,0,0,";
    json += "0]}}";
    Write("long.safetensors", St(json, Pattern(4)));
    json = "{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,4],\"shape\":[";
    while (json.size() < target) json += "1,1,1,1,1,1,1,1,";
    json += "1]}}";
    Write("shape.safetensors", St(json, Pattern(4)));
    json = "{";
    size_t n = 0;
    for (; json.size() < target; n++) {
      const std::string k = std::to_string(n * 4), e = std::to_string(n * 4 + 4);
      json += "\"t" + std::to_string(n) + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" + k + "," + e +
              "]},";
    }
    json.back() = '}';
    Write("many.safetensors", St(json, Pattern(4 * n)));
  }
  for (const auto &c : cases) {
    SCOPED_TRACE(c.label);
    LoadCost cost = LoadInChild(Path(c.spec));
    ASSERT_NE(cost.rc, -2) << "the child did not report";
    if (*c.expect) {
      EXPECT_EQ(cost.rc, -1);
      EXPECT_NE(std::strstr(cost.err, c.expect), nullptr) << cost.err;
    } else {
      EXPECT_EQ(cost.rc, 0) << cost.err;
    }
    // The header once, 24 bytes per tensor (a third of the header when entries are this small), a few MB.
    EXPECT_LT(cost.grown_kb, long(2 * target / 1024) + 8 * 1024) << "peak RSS grew by " << cost.grown_kb << " KB";
    RecordProperty(std::string(c.label) + " KB", std::to_string(cost.grown_kb));
    RecordProperty(std::string(c.label) + " ms", std::to_string(int(cost.seconds * 1000)));
  }
}

// ------------------------------------------------------------------------------------------------
// Saving: the spec checks and the atomic write
// The one-byte integers as numpy writes them: '|i1' and '|u1', no byte order.
TEST_F(TensorFileTest, NpyOneByteIntegersAsNumpyWritesThem) {
  const Bytes data = Pattern(6);
  tn_file_tensor t;
  std::memset(&t, 0, sizeof t);
  t.dtype = TN_I8;
  t.ndim = 2;
  t.rows = 2;
  t.dim = 3;
  t.data = const_cast<char *>(data.data());
  char err[512];
  ASSERT_EQ(tn_file_save(Path("i.npy").c_str(), &t, nullptr, err, sizeof err), 0) << err;
  EXPECT_EQ(Read("i.npy"), NpyV1(NpyDict("|i1", "(2, 3)"), data));
  t.dtype = TN_U8;
  ASSERT_EQ(tn_file_save(Path("u.npy").c_str(), &t, nullptr, err, sizeof err), 0) << err;
  EXPECT_EQ(Read("u.npy"), NpyV1(NpyDict("|u1", "(2, 3)"), data));
}

// A save's metadata goes into the safetensors header's "__metadata__", first, escaped as JSON.
TEST_F(TensorFileTest, SafetensorsMetadataIsWritten) {
  const Bytes data = Pattern(8);
  tn_file_tensor t;
  std::memset(&t, 0, sizeof t);
  t.dtype = TN_U8;
  t.ndim = 2;
  t.rows = 2;
  t.dim = 4;
  t.data = const_cast<char *>(data.data());
  t.meta[0] = {"format", "nvfp4"};
  t.meta[1] = {"packing", "e2m1x2, \"low\" nibble first"};
  char err[512];
  ASSERT_EQ(tn_file_save(Path("q.safetensors").c_str(), &t, "q", err, sizeof err), 0) << err;
  const Bytes json = "{\"__metadata__\":{\"format\":\"nvfp4\",\"packing\":\"e2m1x2, \\\"low\\\" nibble first\"},"
                     "\"q\":" + StEntry("U8", "[2,4]", "[0,8]") + "}";
  const Bytes padded = json + Bytes((8 - json.size() % 8) % 8, ' ');
  EXPECT_EQ(Read("q.safetensors"), St(padded, data));
  tn_file_tensor got;
  ASSERT_EQ(tn_file_load(Path("q.safetensors:q").c_str(), &got, err, sizeof err), 0) << err;
  EXPECT_EQ(got.dtype, TN_U8);
  EXPECT_EQ(got.meta[0].key, nullptr);  // loads leave the metadata empty
  tn_file_tensor_free(&got);
}

// tn_file_load_scalar takes a 0-d tensor as one element; tn_file_load refuses it.
TEST_F(TensorFileTest, ScalarLoadsTakeZeroDimensionalTensors) {
  const Bytes four = Pattern(4);
  Write("s.npy", NpyV1(NpyDict("<f4", "()"), four));
  Write("s.safetensors", St("{\"s\":" + StEntry("F32", "[]", "[0,4]") + "}", four));
  for (const char *spec : {"s.npy", "s.safetensors:s"}) {
    SCOPED_TRACE(spec);
    tn_file_tensor t;
    char err[512];
    ASSERT_EQ(tn_file_load_scalar(Path(spec).c_str(), &t, err, sizeof err), 0) << err;
    EXPECT_EQ(t.dtype, TN_F32);
    EXPECT_EQ(t.ndim, 1);
    EXPECT_EQ(t.rows, 1);
    EXPECT_EQ(t.dim, 1);
    EXPECT_EQ(Bytes(static_cast<const char *>(t.data), 4), four);
    tn_file_tensor_free(&t);
    EXPECT_EQ(tn_file_load(Path(spec).c_str(), &t, err, sizeof err), -1);
    ExpectOneLine(err);
    EXPECT_TRUE(IsZeroed(t));
  }
}

// ------------------------------------------------------------------------------------------------

class TensorFileSave : public TensorFileTest {};

TEST_F(TensorFileSave, CheckSaveKnowsWhatEachFormatHolds) {
  char err[256];
  EXPECT_EQ(tn_file_check_save(Path("a.npy").c_str(), TN_F32, err, sizeof err), 0) << err;
  EXPECT_EQ(tn_file_check_save(Path("a.npy").c_str(), TN_F16, err, sizeof err), 0) << err;
  EXPECT_EQ(tn_file_check_save(Path("a.safetensors").c_str(), TN_BF16, err, sizeof err), 0) << err;
  EXPECT_EQ(tn_file_check_save(Path("a.safetensors:w").c_str(), TN_BF16, err, sizeof err), 0) << err;
  // The directory need not exist: nothing is touched.
  EXPECT_EQ(tn_file_check_save(Path("no/such/dir/a.npy").c_str(), TN_F32, err, sizeof err), 0) << err;

  ASSERT_EQ(tn_file_check_save(Path("a.npy").c_str(), TN_BF16, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_NE(std::strstr(err, ".safetensors"), nullptr) << err;
  EXPECT_NE(std::strstr(err, "bf16"), nullptr) << err;

  // numpy has no FP8 dtype: FP8 goes to .safetensors; the one-byte integers fit .npy.
  for (tn_dtype d : {TN_F8_E4M3, TN_F8_E5M2}) {
    ASSERT_EQ(tn_file_check_save(Path("a.npy").c_str(), d, err, sizeof err), -1);
    ExpectOneLine(err);
    EXPECT_NE(std::strstr(err, ".safetensors"), nullptr) << err;
    EXPECT_NE(std::strstr(err, tn_dtype_name(d)), nullptr) << err;
    EXPECT_EQ(tn_file_check_save(Path("a.safetensors").c_str(), d, err, sizeof err), 0) << err;
  }
  EXPECT_EQ(tn_file_check_save(Path("a.npy").c_str(), TN_I8, err, sizeof err), 0) << err;
  EXPECT_EQ(tn_file_check_save(Path("a.npy").c_str(), TN_U8, err, sizeof err), 0) << err;

  const char *bad[] = {"a.txt", "a.npy:w", "a.safetensors:", "a.safetensors:__metadata__", ""};
  for (const char *spec : bad) {
    SCOPED_TRACE(spec);
    EXPECT_EQ(tn_file_check_save(spec, TN_F32, err, sizeof err), -1);
    ExpectOneLine(err);
  }
  EXPECT_EQ(tn_file_check_save(nullptr, TN_F32, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_EQ(tn_file_check_save("a.safetensors", static_cast<tn_dtype>(7), err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_EQ(tn_file_check_save(("a.safetensors:" + std::string(256, 'n')).c_str(), TN_F32, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_TRUE(List().empty());
}

TEST_F(TensorFileSave, FailedSaveLeavesTargetUntouched) {
  Bytes data = Pattern(16);
  tn_file_tensor t;
  std::memset(&t, 0, sizeof t);
  t.dtype = TN_BF16;
  t.ndim = 2;
  t.rows = 2;
  t.dim = 4;
  t.data = &data[0];
  Write("t.npy", "ORIGINAL");
  ASSERT_EQ(mkdir(Path("sub.npy").c_str(), 0755), 0);  // a directory where the file should go
  Write("sub.npy/keep", "x");
  char err[256];

  EXPECT_EQ(tn_file_save(Path("t.npy").c_str(), &t, nullptr, err, sizeof err), -1);  // bf16 into .npy
  ExpectOneLine(err);
  t.dtype = TN_F32;
  t.rows = 1;
  EXPECT_EQ(tn_file_save(Path("missing/t.npy").c_str(), &t, nullptr, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_NE(std::strstr(err, "missing/t.npy"), nullptr) << err;
  // The temporary is written in full, then rename() fails on the directory: it must be removed.
  EXPECT_EQ(tn_file_save(Path("sub.npy").c_str(), &t, nullptr, err, sizeof err), -1);
  ExpectOneLine(err);

  EXPECT_EQ(Read("t.npy"), "ORIGINAL");
  EXPECT_EQ(List(), (std::set<std::string>{"t.npy", "sub.npy"}));
  EXPECT_TRUE(fs::exists(Path("sub.npy/keep")));

  ASSERT_EQ(tn_file_save(Path("t.npy").c_str(), &t, nullptr, err, sizeof err), 0) << err;
  EXPECT_EQ(Read("t.npy").size(), 128u + 16u);
  EXPECT_EQ(List(), (std::set<std::string>{"t.npy", "sub.npy"}));
  struct stat st;
  ASSERT_EQ(stat(Path("t.npy").c_str(), &st), 0);
  mode_t mask = umask(022);
  umask(mask);
  EXPECT_EQ(st.st_mode & 0777, 0666 & ~mask) << "not mkstemp's 0600: the permissions of any new file";
}

TEST_F(TensorFileSave, RefusesInvalidTensors) {
  Bytes data = Pattern(64);
  auto make = [&](tn_dtype dtype, int ndim, int64_t rows, int64_t dim) {
    tn_file_tensor t;
    std::memset(&t, 0, sizeof t);
    t.dtype = dtype;
    t.ndim = ndim;
    t.rows = rows;
    t.dim = dim;
    t.data = &data[0];
    return t;
  };
  tn_file_tensor bad[] = {make(TN_F32, 3, 2, 2),
                          make(TN_F32, 1, 2, 2),
                          make(TN_F32, 2, -1, 2),
                          make(TN_F32, 2, 2, -5),
                          make(static_cast<tn_dtype>(9), 2, 1, 1),
                          make(TN_F32, 2, INT64_MAX, 2),
                          make(TN_F32, 2, 2, 2)};
  bad[6].data = nullptr;
  char err[256];
  for (const auto &t : bad) {
    for (const char *file : {"x.npy", "x.safetensors:x"}) {
      EXPECT_EQ(tn_file_save(Path(file).c_str(), &t, "d", err, sizeof err), -1) << file;
      ExpectOneLine(err);
    }
  }
  tn_file_tensor ok = make(TN_F32, 2, 2, 2);
  EXPECT_EQ(tn_file_save(Path("x.safetensors").c_str(), &ok, nullptr, err, sizeof err), -1);  // no name
  ExpectOneLine(err);
  EXPECT_EQ(tn_file_save(Path("x.safetensors").c_str(), &ok, "__metadata__", err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_EQ(tn_file_save(Path("x.npy").c_str(), nullptr, nullptr, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_TRUE(List().empty());

  std::strcpy(ok.name, "from_struct");  // the last fallback for the name
  ASSERT_EQ(tn_file_save(Path("x.safetensors").c_str(), &ok, nullptr, err, sizeof err), 0) << err;
  tn_file_tensor got;
  ASSERT_EQ(tn_file_load(Path("x.safetensors:from_struct").c_str(), &got, err, sizeof err), 0) << err;
  tn_file_tensor_free(&got);
}

// Every reader refuses a header that is not UTF-8, so the writer does not write one.
TEST_F(TensorFileSave, RefusesNamesThatAreNotUtf8) {
  Bytes data = Pattern(8);
  tn_file_tensor t;
  std::memset(&t, 0, sizeof t);
  t.dtype = TN_F32;
  t.ndim = 1;
  t.rows = 1;
  t.dim = 2;
  t.data = &data[0];
  char err[256];
  for (const char *name : {"w\xff", "w\xc0\xaf", "w\xed\xa0\x80", "w\xe2\x82"}) {
    EXPECT_EQ(tn_file_save((Path("u.safetensors:") + name).c_str(), &t, nullptr, err, sizeof err), -1);
    ExpectOneLine(err);
    EXPECT_NE(std::strstr(err, "not valid UTF-8"), nullptr) << err;
    // Known before anything is computed: the command checks its outputs' specs first.
    err[0] = '\0';
    EXPECT_EQ(tn_file_check_save((Path("u.safetensors:") + name).c_str(), TN_F32, err, sizeof err), -1);
    EXPECT_NE(std::strstr(err, "not valid UTF-8"), nullptr) << err;
  }
  EXPECT_TRUE(List().empty());
}

TEST(TensorFileApi, FreeAndErrorBuffersAreSafe) {
  tn_file_tensor_free(nullptr);
  tn_file_tensor t;
  std::memset(&t, 0x5a, sizeof t);
  t.data = nullptr;
  tn_file_tensor_free(&t);
  EXPECT_TRUE(IsZeroed(t));

  EXPECT_EQ(tn_file_load("/nonexistent/x.npy", &t, nullptr, 0), -1);
  EXPECT_EQ(tn_file_load("/nonexistent/x.npy", nullptr, nullptr, 0), -1);
  char tiny[8];
  EXPECT_EQ(tn_file_load("/nonexistent/x.npy", &t, tiny, sizeof tiny), -1);
  EXPECT_EQ(std::strlen(tiny), sizeof tiny - 1);
  char err[256];
  EXPECT_EQ(tn_file_load("/nonexistent/x.npy", &t, err, sizeof err), -1);
  EXPECT_EQ(std::strncmp(err, "/nonexistent/x.npy: ", 20), 0) << err;
  EXPECT_EQ(tn_file_load("/nonexistent/a\nb.npy", &t, err, sizeof err), -1);
  ExpectOneLine(err);
}

// ------------------------------------------------------------------------------------------------
// Malformed files: each refused with a one-line message that names the file and the problem
// ------------------------------------------------------------------------------------------------

enum class Setup { kWrite, kNothing, kDirectory };

struct Malformed {
  std::string label;  // the test name
  std::string file;
  std::string tail;  // appended to the path in the spec (":TENSOR")
  Bytes bytes;
  std::string expect;  // a part of the message
  Setup setup = Setup::kWrite;
};

// gtest would otherwise dump the struct's raw bytes, padding included.
void PrintTo(const Malformed &c, std::ostream *os) { *os << c.label; }

std::vector<Malformed> NpyCases() {
  const Bytes d16 = Pattern(16);
  const Bytes dict4 = NpyDict("<f4", "(4,)");
  return {
      {"npy_zero_length", "e.npy", "", "", "empty"},
      {"npy_truncated_magic", "e.npy", "", kMagic.substr(0, 4), "truncated"},
      {"npy_bad_magic", "e.npy", "", "PK\x03\x04 this is a zip file", "magic"},
      {"npy_no_header_length", "e.npy", "", kMagic + Bytes("\x02\x00\x10", 3), "truncated"},
      {"npy_bad_version", "e.npy", "", NpyRaw(4, dict4, d16), "version 4.0"},
      {"npy_bad_minor_version", "e.npy", "", kMagic + Bytes("\x01\x01", 2) + U16(2) + "{}", "version 1.1"},
      {"npy_header_past_eof_v1", "e.npy", "", kMagic + Bytes("\x01\x00", 2) + U16(5000) + dict4, "past the end"},
      {"npy_header_past_eof_v2", "e.npy", "", kMagic + Bytes("\x02\x00", 2) + U32(9000) + dict4, "past the end"},
      // np.load refuses headers over 10000 characters (unless pickles are allowed).
      {"npy_header_over_numpy_limit", "e.npy", "",
       NpyRaw(2, dict4 + Bytes(10001 - dict4.size() - 1, ' ') + "\n", d16), "more than 10000"},
      {"npy_header_length_absurd", "e.npy", "", kMagic + Bytes("\x03\x00", 2) + U32(0xffffffffu) + dict4,
       "absurd"},
      {"npy_garbage_dict", "e.npy", "", NpyV1("hello, world", d16), "malformed"},
      {"npy_binary_header", "e.npy", "", NpyRaw(1, Bytes("{\0\xff\x01}", 5), d16), "malformed"},
      {"npy_unterminated_dict", "e.npy", "", NpyRaw(1, "{'descr': '<f4', ", d16), "malformed"},
      {"npy_unterminated_string", "e.npy", "", NpyRaw(1, "{'descr': '<f4", d16), "unterminated"},
      {"npy_unknown_key", "e.npy", "",
       NpyV1("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'x': 1}", d16), "unknown key 'x'"},
      {"npy_missing_key", "e.npy", "", NpyV1("{'descr': '<f4', 'shape': (4,)}", d16),
       "missing key 'fortran_order'"},
      {"npy_duplicate_key", "e.npy", "",
       NpyV1("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (4,)}", d16), "duplicate key"},
      {"npy_text_after_dict", "e.npy", "", NpyV1(dict4 + " 'x'", d16), "after the dict"},
      {"npy_escape_in_string", "e.npy", "", NpyV1(NpyDict("<f\\x34", "(4,)"), d16), "malformed"},
      {"npy_fortran_not_bool", "e.npy", "", NpyV1(NpyDict("<f4", "(4,)", "0"), d16), "True or False"},
      {"npy_big_endian", "e.npy", "", NpyV1(NpyDict(">f4", "(4,)"), d16), "big-endian"},
      {"npy_int_dtype", "e.npy", "", NpyV1(NpyDict("<i4", "(4,)"), d16), "unsupported dtype '<i4'"},
      {"npy_f8_dtype", "e.npy", "", NpyV1(NpyDict("<f8", "(2,)"), d16), "unsupported dtype '<f8'"},
      {"npy_no_byte_order", "e.npy", "", NpyV1(NpyDict("|f4", "(4,)"), d16), "invalid dtype '|f4'"},
      {"npy_fortran_order", "e.npy", "", NpyV1(NpyDict("<f4", "(2, 2)", "True"), d16), "fortran_order"},
      {"npy_3d_shape", "e.npy", "", NpyV1(NpyDict("<f4", "(2, 2, 1)"), d16), "3-D"},
      {"npy_0d_shape", "e.npy", "", NpyV1(NpyDict("<f4", "()"), d16.substr(0, 4)), "0-d"},
      {"npy_shape_not_tuple", "e.npy", "", NpyV1(NpyDict("<f4", "(4)"), d16), "tuple"},
      {"npy_shape_list", "e.npy", "", NpyV1(NpyDict("<f4", "[4]"), d16), "tuple"},
      {"npy_negative_shape", "e.npy", "", NpyV1(NpyDict("<f4", "(-1, 4)"), d16), "negative"},
      // Python 3 refuses 04 (a syntax error), so numpy refuses the header.
      {"npy_shape_leading_zeros", "e.npy", "", NpyV1(NpyDict("<f4", "(02, 02)"), d16), "leading zero"},
      {"npy_shape_leading_zero_1d", "e.npy", "", NpyV1(NpyDict("<f4", "(04,)"), d16), "leading zero"},
      // ast.literal_eval strips only spaces and tabs before the dict; an indented line is an error.
      {"npy_indented_line_before_dict", "e.npy", "", NpyRaw(1, " \n " + dict4 + "\n", d16), "expected '{'"},
      // After the dict, a last line of spaces without its newline is an indentation error.
      {"npy_indented_last_line", "e.npy", "", NpyRaw(1, dict4 + "\n  ", d16), "after the dict"},
      {"npy_nul_after_dict", "e.npy", "", NpyRaw(1, dict4 + Bytes(" \0\n", 3), d16), "after the dict"},
      {"npy_float_shape", "e.npy", "", NpyV1(NpyDict("<f4", "(4.0,)"), d16), "not a plain integer"},
      {"npy_shape_overflows_int64", "e.npy", "", NpyV1(NpyDict("<f4", "(99999999999999999999,)"), d16),
       "overflows int64"},
      {"npy_byte_size_overflows", "e.npy", "", NpyV1(NpyDict("<f4", "(4611686018427387904, 4)"), d16),
       "too large"},
      {"npy_data_shorter", "e.npy", "", NpyV1(dict4, d16.substr(0, 12)),
       "header says 16 bytes of data, file has 12"},
      {"npy_data_longer", "e.npy", "", NpyV1(dict4, d16 + "xxxx"), "header says 16 bytes of data, file has 20"},
      {"npy_directory", "d.npy", "", "", "not a regular file", Setup::kDirectory},
      {"npy_missing_file", "none.npy", "", "", "cannot open", Setup::kNothing},
      {"unknown_extension", "x.bin", "", "", "unknown tensor file type"},
  };
}

std::vector<Malformed> SafetensorsCases() {
  const Bytes buf16 = Pattern(16);
  auto one = [&](const Bytes &entry) { return St("{\"w\":" + entry + "}", buf16); };
  return {
      {"st_zero_length", "e.safetensors", ":w", "", "empty"},
      {"st_shorter_than_length", "e.safetensors", ":w", Bytes("\x10\x00\x00", 3), "truncated"},
      {"st_header_past_eof", "e.safetensors", ":w", U64(1000) + "{}", "past the end"},
      {"st_header_length_huge", "e.safetensors", ":w", U64(uint64_t(1) << 63) + "{}", "absurd"},
      {"st_header_length_just_over_limit", "e.safetensors", ":w", U64(100000001) + "{}", "absurd"},
      {"st_json_not_object", "e.safetensors", ":w", St("[1, 2]", ""), "not an object"},
      {"st_json_invalid", "e.safetensors", ":w", St("{\"w\": {\"dtype\": ", buf16), "not valid JSON"},
      {"st_json_empty", "e.safetensors", ":w", St("", buf16), "not valid JSON"},
      {"st_json_trailing_garbage", "e.safetensors", ":w", St("{}  x", ""), "after the header JSON"},
      {"st_missing_tensor", "e.safetensors", ":w",
       St("{\"a\":" + StEntry("F32", "[2]", "[0,8]") + ",\"b\":" + StEntry("F32", "[2]", "[8,16]") + "}", buf16),
       "no tensor 'w' (the file has: 'a', 'b')"},
      {"st_missing_tensor_many", "e.safetensors", ":w",
       [&] {
         Bytes json = "{";
         for (int i = 0; i < 20; i++)
           json += "\"t" + std::to_string(i) + "\":" + StEntry("F32", "[0]", "[0,0]") + ",";
         json.back() = '}';
         return St(json, "");
       }(),
       "and 12 more"},
      {"st_no_tensors", "e.safetensors", ":w", St("{\"__metadata__\":{}}", ""), "no tensors"},
      {"st_dtype_i32", "e.safetensors", ":w", one(StEntry("I32", "[4]", "[0,16]")), "'I32'"},
      {"st_dtype_missing", "e.safetensors", ":w", one("{\"shape\":[4],\"data_offsets\":[0,16]}"), "no dtype"},
      {"st_entry_not_object", "e.safetensors", ":w", one("[1,2,3]"), "not an object"},
      {"st_duplicate_tensor", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") + ",\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "appears 2 times"},
      {"st_shape_3d", "e.safetensors", ":w", one(StEntry("F32", "[2,2,1]", "[0,16]")), "3-D"},
      {"st_shape_0d", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[]", "[0,4]") + "}", buf16.substr(0, 4)), "0-D"},
      {"st_shape_negative", "e.safetensors", ":w", one(StEntry("F32", "[-4]", "[0,16]")), "not an integer"},
      {"st_shape_overflows", "e.safetensors", ":w", one(StEntry("F32", "[4294967296,4294967296]", "[0,16]")),
       "overflow"},
      {"st_shape_huge_value", "e.safetensors", ":w", one(StEntry("F32", "[1e300]", "[0,16]")), "not an integer"},
      {"st_shape_string", "e.safetensors", ":w", one(StEntry("F32", "[\"4\"]", "[0,16]")), "not an integer"},
      {"st_offsets_reversed", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[16,0]")), "begin > end"},
      {"st_offsets_past_end", "e.safetensors", ":w", one(StEntry("F32", "[16]", "[0,64]")),
       "past the 16-byte buffer"},
      {"st_offsets_non_integer", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[0,15.5]")), "not integers"},
      {"st_offsets_negative", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[-4,12]")), "not integers"},
      {"st_offsets_one_number", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[16]")), "data_offsets"},
      {"st_offsets_huge", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[18446744073709551615,1e19]")),
       "not integers"},
      {"st_size_mismatch", "e.safetensors", ":w", one(StEntry("F32", "[2,2]", "[0,12]")), "its shape needs 16"},
      {"st_spec_without_tensor", "e.safetensors", "", one(StEntry("F32", "[4]", "[0,16]")), "name the tensor"},
      {"st_spec_empty_tensor_name", "e.safetensors", ":", one(StEntry("F32", "[4]", "[0,16]")), "no tensor name"},
      {"st_spec_metadata", "e.safetensors", ":__metadata__", St("{\"__metadata__\":{}}", ""), "reserved"},
      {"st_spec_name_too_long", "e.safetensors", ":" + std::string(300, 'w'), one("{}"), "longer than 255"},

      // The header text as the reference reads it: UTF-8 (Rust's str::from_utf8), then serde_json.
      {"st_bom", "e.safetensors", ":w", St("\xef\xbb\xbf{\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "byte order mark"},
      {"st_invalid_utf8", "e.safetensors", ":w",
       St("{\"v\xff\":" + StEntry("U8", "[0]", "[0,0]") + ",\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}",
          buf16),
       "not valid UTF-8 (at byte 3)"},
      {"st_overlong_utf8", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"k\":\"\xc0\xaf\"},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "not valid UTF-8"},
      {"st_utf8_encoded_surrogate", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"k\":\"\xed\xa0\x80\"},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "not valid UTF-8"},
      {"st_utf8_truncated", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"k\":\"\xe2\x82\"},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "not valid UTF-8"},
      {"st_utf8_above_u10ffff", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"k\":\"\xf4\x90\x80\x80\"},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "not valid UTF-8"},
      {"st_lone_high_surrogate", "e.safetensors", ":w",
       St("{\"w\\ud800\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "surrogate"},
      {"st_lone_low_surrogate", "e.safetensors", ":w",
       St("{\"w\\udc00\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "surrogate"},
      {"st_high_surrogate_then_letter", "e.safetensors", ":w",
       St("{\"w\\ud83d\\u0041\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "surrogate"},
      {"st_lone_surrogate_in_metadata", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"k\":\"\\udfff\"},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "surrogate"},
      {"st_nul_in_name", "e.safetensors", ":x",
       St("{\"x\\u0000evil\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "U+0000"},
      {"st_raw_control_character", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"k\":\"a\tb\"},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "control character"},
      {"st_invalid_escape", "e.safetensors", ":w",
       St("{\"w\\a\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "invalid escape"},
      {"st_short_unicode_escape", "e.safetensors", ":w",
       St("{\"w\\u12\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "\\u escape"},
      {"st_trailing_comma", "e.safetensors", ":w", St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") + ",}", buf16),
       "not valid JSON"},
      {"st_form_feed_after", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}\f", buf16), "after the header JSON"},
      {"st_single_quotes", "e.safetensors", ":w", St("{'w':" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "not valid JSON"},
      {"st_nested_too_deep", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"x\":" + Bytes(126, '[') + Bytes(126, ']') +
           "}"),
       "nested more than 127 deep"},
      {"st_number_out_of_range", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"x\":1e400}"), "out of range"},
      // serde_json's own arithmetic overflows here, though the value is just below the largest double.
      {"st_number_out_of_range_for_serde", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"x\":1.7976931348623158e308}"),
       "out of range"},
      {"st_number_leading_zero", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"x\":01}"), "leading zero"},
      {"st_bad_literal", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"x\":tru}"), "not valid JSON"},

      // Integers are u64, read exactly: serde_json reads these as floats, which a usize refuses.
      {"st_shape_float", "e.safetensors", ":w", one(StEntry("F32", "[4.0]", "[0,16]")), "not an integer"},
      {"st_shape_exponent", "e.safetensors", ":w", one(StEntry("F32", "[4e0]", "[0,16]")), "not an integer"},
      {"st_shape_minus_zero", "e.safetensors", ":w", one(StEntry("F32", "[-0,4]", "[0,0]")), "not an integer"},
      {"st_shape_leading_zero", "e.safetensors", ":w", one(StEntry("F32", "[04]", "[0,16]")), "not an integer"},
      {"st_shape_2pow64", "e.safetensors", ":w", one(StEntry("F32", "[18446744073709551616,0]", "[0,0]")),
       "not an integer"},
      {"st_offsets_float", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[0,16.0]")), "not integers"},
      {"st_offsets_three", "e.safetensors", ":w", one(StEntry("F32", "[4]", "[0,16,16]")), "not [begin, end]"},
      {"st_shape_extent_beyond_int64", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[0,9223372036854775808]", "[0,0]") + "}", ""), "too large"},

      // The schema: dtypes the reference knows, fields once each, __metadata__ a map of strings.
      {"st_dtype_unknown", "e.safetensors", ":w", one(StEntry("F33", "[4]", "[0,16]")), "unknown dtype 'F33'"},
      {"st_dtype_lowercase", "e.safetensors", ":w", one(StEntry("f32", "[4]", "[0,16]")), "unknown dtype 'f32'"},
      {"st_dtype_unknown_long", "e.safetensors", ":w", one(StEntry("F32_AND_THEN_SOME_MORE", "[4]", "[0,16]")),
       "unknown dtype 'F32_AND_THEN_SO...'"},
      {"st_dtype_as_map", "e.safetensors", ":w",
       one("{\"dtype\":{\"F32\":null},\"shape\":[4],\"data_offsets\":[0,16]}"), "not a string"},
      {"st_entry_as_array", "e.safetensors", ":w", one("[\"F32\",[4],[0,16]]"), "not an object"},
      {"st_duplicate_dtype_field", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}"), "field 'dtype' twice"},
      {"st_duplicate_shape_field", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"shape\":[4],\"data_offsets\":[0,16]}"), "field 'shape' twice"},
      {"st_duplicate_escaped_field", "e.safetensors", ":w",
       one("{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"data\\u005foffsets\":[0,16]}"),
       "field 'data_offsets' twice"},
      {"st_duplicate_metadata", "e.safetensors", ":w",
       St("{\"__metadata__\":{},\"w\":" + StEntry("F32", "[4]", "[0,16]") + ",\"__metadata__\":null}", buf16),
       "__metadata__ twice"},
      {"st_duplicate_escaped_name", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("U8", "[8]", "[0,8]") + ",\"\\u0077\":" + StEntry("U8", "[8]", "[8,16]") + "}",
          buf16),
       "tensor 'w' appears 2 times"},
      {"st_duplicate_other_name", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[2]", "[0,8]") + ",\"a\":" + StEntry("U8", "[4]", "[8,12]") +
              ",\"a\":" + StEntry("U8", "[4]", "[12,16]") + "}",
          buf16),
       "tensor 'a' appears 2 times"},
      {"st_metadata_not_strings", "e.safetensors", ":w",
       St("{\"__metadata__\":{\"n\":1},\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16), "not a string"},
      {"st_metadata_array", "e.safetensors", ":w",
       St("{\"__metadata__\":[],\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "not an object of strings"},

      // Metadata::validate and read_metadata: the entries tile the data buffer exactly.
      {"st_gap", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[1]", "[0,4]") + ",\"b\":" + StEntry("U8", "[8]", "[8,16]") + "}", buf16),
       "no tensor covers bytes [4, 8)"},
      {"st_gap_at_start", "e.safetensors", ":w", one(StEntry("F32", "[2]", "[8,16]")),
       "no tensor covers bytes [0, 8)"},
      {"st_overlap", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[3]", "[0,12]") + ",\"b\":" + StEntry("U8", "[8]", "[8,16]") + "}", buf16),
       "tensors 'w' and 'b' overlap"},
      {"st_same_offsets", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") + ",\"b\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16),
       "overlap"},
      {"st_bytes_after_last_tensor", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") + "}", buf16 + "xyz"),
       "the tensors end at byte 16 of the 19-byte data buffer"},
      {"st_zero_size_past_end", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") + ",\"z\":" + StEntry("F32", "[0]", "[20,20]") + "}",
          buf16),
       "no tensor covers bytes [16, 20)"},
      {"st_bad_size_in_other_tensor", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[2]", "[0,8]") + ",\"i\":" + StEntry("I64", "[1]", "[8,16]") +
              ",\"b\":" + StEntry("BOOL", "[1]", "[16,16]") + "}",
          buf16),
       "tensor 'b' has 0 bytes of data, its shape needs 1"},
      {"st_sub_byte_dtype_not_whole_bytes", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[3]", "[0,12]") + ",\"q\":" + StEntry("F4", "[7]", "[12,16]") + "}", buf16),
       "7 elements of 4 bits"},
      {"st_shape_overflows_with_zero_after", "e.safetensors", ":w",
       St("{\"w\":" + StEntry("F32", "[4]", "[0,16]") +
              ",\"z\":" + StEntry("U8", "[4294967296,4294967296,0]", "[16,16]") + "}",
          buf16),
       "tensor 'z' has a shape whose size overflows 64 bits"},
  };
}

class TensorFileMalformed : public TensorFileTest, public ::testing::WithParamInterface<Malformed> {};

TEST_P(TensorFileMalformed, RefusedWithOneLineMessage) {
  const Malformed &c = GetParam();
  if (c.setup == Setup::kWrite) Write(c.file, c.bytes);
  if (c.setup == Setup::kDirectory) ASSERT_EQ(mkdir(Path(c.file).c_str(), 0755), 0);
  const std::string spec = Path(c.file) + c.tail;
  tn_file_tensor t;
  std::memset(&t, 0x5a, sizeof t);  // garbage in: the loader must not trust it
  char err[512];
  std::memset(err, 'X', sizeof err);
  ASSERT_EQ(tn_file_load(spec.c_str(), &t, err, sizeof err), -1);
  RecordProperty("message", err);  // the messages, for review: --gtest_output=json
  ExpectOneLine(err);
  EXPECT_EQ(std::string(err).rfind(Path(c.file) + ": ", 0), 0u) << "names the file: " << err;
  EXPECT_NE(std::strstr(err, c.expect.c_str()), nullptr) << "expected '" << c.expect << "' in: " << err;
  EXPECT_TRUE(IsZeroed(t));
}

std::string CaseName(const ::testing::TestParamInfo<Malformed> &info) { return info.param.label; }

INSTANTIATE_TEST_SUITE_P(TensorFile, TensorFileMalformed, ::testing::ValuesIn(NpyCases()), CaseName);
INSTANTIATE_TEST_SUITE_P(TensorFileSt, TensorFileMalformed, ::testing::ValuesIn(SafetensorsCases()), CaseName);

// Every prefix of valid files, and each of their bytes flipped, is refused or loaded cleanly, never
// a crash or a read past the buffer (run under valgrind or ASan to see the latter).
TEST_F(TensorFileTest, TensorFileTruncationsAndBitFlipsNeverCrash) {
  const Bytes files[] = {NpyV1(NpyDict("<f2", "(2, 3)"), Pattern(12)),
                         St("{\"w\":" + StEntry("BF16", "[2,3]", "[0,12]") + "}", Pattern(12))};
  const char *names[] = {"f.npy", "f.safetensors"};
  char err[256];
  for (int k = 0; k < 2; k++) {
    const std::string spec = Path(names[k]) + (k ? ":w" : "");
    for (size_t n = 0; n <= files[k].size(); n++) {
      for (int flip = -1; flip < 8 && size_t(flip + 1) <= files[k].size(); flip++) {
        Bytes b = files[k].substr(0, n);
        if (flip >= 0 && n > 0) b[size_t(flip) * 13 % n] ^= char(0x41 << (flip % 2));
        Write(names[k], b);
        tn_file_tensor t;
        int rc = tn_file_load(spec.c_str(), &t, err, sizeof err);
        if (rc == 0) {
          tn_file_tensor_free(&t);
        } else {
          ExpectOneLine(err);
          EXPECT_TRUE(IsZeroed(t));
        }
      }
    }
    // The untouched file loads.
    Write(names[k], files[k]);
    tn_file_tensor t;
    EXPECT_EQ(tn_file_load(spec.c_str(), &t, err, sizeof err), 0) << err;
    tn_file_tensor_free(&t);
  }
}

}  // namespace
