// Tensor files (.npy, .safetensors): round trips, bytes as numpy writes them, the atomic save, and
// malformed files, each of which must be refused with a one-line message and nothing leaked.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

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

class TensorFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tnorm_tensor_file_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string Path(const std::string &name) const { return dir_ + "/" + name; }
  void Write(const std::string &name, const Bytes &bytes) const {
    std::ofstream(Path(name), std::ios::binary) << bytes;
  }
  Bytes Read(const std::string &name) const {
    std::ifstream in(Path(name), std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }
  std::set<std::string> List() const {
    std::set<std::string> names;
    for (const auto &e : fs::directory_iterator(dir_)) names.insert(e.path().filename().string());
    return names;
  }
  std::string dir_;
};

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

// ------------------------------------------------------------------------------------------------
// Saving: the spec checks and the atomic write
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
      {"npy_header_past_eof_v2", "e.npy", "", kMagic + Bytes("\x02\x00", 2) + U32(70000) + dict4, "past the end"},
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
      {"st_shape_0d", "e.safetensors", ":w", one(StEntry("F32", "[]", "[0,4]")), "0-D"},
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
