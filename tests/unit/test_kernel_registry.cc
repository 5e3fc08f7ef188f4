// The CUDA backend's parts that need no GPU: the disk cache of compiled kernels (pure file functions),
// the kernel registry (keys, names, row shapes, building with NVRTC through the disk cache), and the
// library's behaviour on a machine without an NVIDIA driver. They run on any machine that builds the
// CUDA backend: NVRTC ships with the toolkit, a GPU and its driver are not needed.
//
// Every test gets its own empty cache directory (TNORM_CACHE_DIR), removed afterwards, so no test sees
// entries left by another test, by an earlier run or by the user's own cache.
#include <gtest/gtest.h>

#ifdef TNORM_CUDA  // the disk cache and the registry are compiled into the library only with the CUDA backend

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <ostream>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tnorm.h"

// The library's internal headers are C without extern "C" guards.
extern "C" {
#include "cuda/disk_cache.h"
#include "cuda/registry.h"
}

namespace {

namespace fs = std::filesystem;

using Bytes = std::vector<unsigned char>;

Bytes ReadFile(const std::string &path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string &path, const Bytes &data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char *>(data.data()), (std::streamsize)data.size());
  ASSERT_TRUE(f.good()) << "cannot write " << path;
}

// The names of the entries of a directory, sorted.
std::vector<std::string> ListDir(const std::string &dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto &e : fs::directory_iterator(dir, ec)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// Saves an environment variable on construction and restores it (or its absence) on destruction, so a
// test that changes the environment leaves it as it found it whatever assertion fails.
class EnvGuard {
 public:
  explicit EnvGuard(const char *name) : name_(name) {
    const char *v = getenv(name);
    was_set_ = v != nullptr;
    if (was_set_) value_ = v;
  }
  ~EnvGuard() {
    if (was_set_)
      setenv(name_.c_str(), value_.c_str(), 1);
    else
      unsetenv(name_.c_str());
  }
  EnvGuard(const EnvGuard &) = delete;
  EnvGuard &operator=(const EnvGuard &) = delete;

 private:
  std::string name_, value_;
  bool was_set_ = false;
};

// A fresh temporary directory named by TNORM_CACHE_DIR for the test's duration.
class CacheDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char *tmp = getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && tmp[0] != '\0' ? tmp : "/tmp") + "/tnorm-cache-test-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    ASSERT_NE(mkdtemp(buf.data()), nullptr) << "mkdtemp " << pattern;
    dir = buf.data();
    setenv("TNORM_CACHE_DIR", dir.c_str(), 1);
  }
  void TearDown() override {
    std::error_code ec;
    if (!dir.empty()) fs::remove_all(dir, ec);
  }

  std::string PathOf(const std::string &key) const { return PathOf(dir, key); }
  static std::string PathOf(const std::string &d, const std::string &key) {
    char path[4096];
    tn_disk_cache_path(d.c_str(), key.c_str(), path, sizeof path);
    return path;
  }

  std::string dir;

 private:
  EnvGuard cache_env_{"TNORM_CACHE_DIR"};  // restored after TearDown
};

// ------------------------------------------------------------------------------------------------
// DiskCache: the file store on its own, no NVRTC.
// ------------------------------------------------------------------------------------------------

class DiskCache : public CacheDirTest {
 protected:
  void SetUp() override {
    CacheDirTest::SetUp();
    // Not text: NUL bytes and every byte value, so nothing stops at a NUL or is read as a string.
    payload.resize(1000);
    for (size_t i = 0; i < payload.size(); i++) payload[i] = (unsigned char)(i * 37 + 11);
    payload[0] = 0;
    payload[500] = 0;
  }

  int Store(const std::string &key, const Bytes &p) { return Store(dir, key, p); }
  static int Store(const std::string &d, const std::string &key, const Bytes &p) {
    return tn_disk_cache_store(d.c_str(), key.c_str(), p.data(), p.size());
  }

  // Loads key from the directory; on a hit the payload comes back in *got. On anything else the output
  // pointers must be left alone.
  tn_disk_lookup Load(const std::string &key, Bytes *got = nullptr) { return Load(dir, key, got); }
  static tn_disk_lookup Load(const std::string &d, const std::string &key, Bytes *got = nullptr) {
    void *const sentinel = reinterpret_cast<void *>(0x1);
    void *p = sentinel;
    size_t n = 12345;
    tn_disk_lookup r = tn_disk_cache_load(d.c_str(), key.c_str(), &p, &n);
    if (r == TN_DISK_HIT) {
      EXPECT_NE(p, sentinel);
      if (got != nullptr) got->assign((unsigned char *)p, (unsigned char *)p + n);
      free(p);
    } else {
      EXPECT_EQ(p, sentinel) << "the payload pointer was written on a lookup that did not hit";
      EXPECT_EQ(n, 12345u) << "the size was written on a lookup that did not hit";
    }
    return r;
  }

  Bytes payload;
  const std::string key = "tnorm kernel cache 1\nkernel A\noptions --x";
  const std::string other_key = "tnorm kernel cache 1\nkernel B\noptions --x";  // the same length
};

TEST_F(DiskCache, StoreThenLoadIsAHitWithTheExactPayload) {
  ASSERT_EQ(Store(key, payload), 0);
  Bytes got;
  ASSERT_EQ(Load(key, &got), TN_DISK_HIT);
  EXPECT_EQ(got, payload);
  // A second store of the same key replaces the entry.
  Bytes second(77, 0xA5);
  ASSERT_EQ(Store(key, second), 0);
  ASSERT_EQ(Load(key, &got), TN_DISK_HIT);
  EXPECT_EQ(got, second);
  EXPECT_EQ(ListDir(dir).size(), 1u);
}

TEST_F(DiskCache, MissingKeyIsAMiss) {
  EXPECT_EQ(Load(key), TN_DISK_MISS);
  // A directory that does not exist is a miss too, not an error.
  EXPECT_EQ(Load(dir + "/does/not/exist", key), TN_DISK_MISS);
}

TEST_F(DiskCache, DifferentKeyIsAMissInItsOwnFile) {
  ASSERT_EQ(Store(key, payload), 0);
  EXPECT_NE(PathOf(key), PathOf(other_key));
  EXPECT_EQ(Load(other_key), TN_DISK_MISS);
  // A key that differs only in its end (as keys of one kernel for two architectures do) also has its own file.
  EXPECT_NE(PathOf(key), PathOf(key + "0"));
  EXPECT_EQ(Load(key + "0"), TN_DISK_MISS);
  // The entry lives in the directory, under a name ending in .cubin.
  const std::string path = PathOf(key);
  EXPECT_EQ(path.rfind(dir + "/", 0), 0u) << path;
  EXPECT_EQ(fs::path(path).extension(), ".cubin");
  EXPECT_TRUE(fs::exists(path));
}

TEST_F(DiskCache, TruncatedByOneByteIsRejected) {
  ASSERT_EQ(Store(key, payload), 0);
  const std::string path = PathOf(key);
  const auto size = fs::file_size(path);
  ASSERT_GT(size, payload.size());
  ASSERT_EQ(truncate(path.c_str(), (off_t)size - 1), 0);
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
}

TEST_F(DiskCache, FlippedPayloadByteIsRejected) {
  ASSERT_EQ(Store(key, payload), 0);
  const std::string path = PathOf(key);
  const Bytes good = ReadFile(path);
  ASSERT_GT(good.size(), payload.size());
  // The payload is the file's tail: flip one bit of its first, middle and last byte, one at a time.
  for (size_t from_end : {payload.size(), payload.size() / 2, (size_t)1}) {
    SCOPED_TRACE(from_end);
    Bytes bad = good;
    bad[bad.size() - from_end] ^= 0x01;
    WriteFile(path, bad);
    EXPECT_EQ(Load(key), TN_DISK_REJECTED);
  }
  // The check is not fooled by every byte of the file either: the header and the stored key are covered.
  for (size_t at : {(size_t)0, (size_t)8, (size_t)16, (size_t)24, (size_t)32, (size_t)32 + key.size() - 1}) {
    SCOPED_TRACE(at);
    Bytes bad = good;
    bad[at] ^= 0x01;
    WriteFile(path, bad);
    EXPECT_EQ(Load(key), TN_DISK_REJECTED);
  }
  // The untouched file still loads: what was rejected was the damage, not the entry.
  WriteFile(path, good);
  Bytes got;
  EXPECT_EQ(Load(key, &got), TN_DISK_HIT);
  EXPECT_EQ(got, payload);
}

TEST_F(DiskCache, AppendedByteIsRejected) {
  ASSERT_EQ(Store(key, payload), 0);
  const std::string path = PathOf(key);
  Bytes bad = ReadFile(path);
  bad.push_back(0);
  WriteFile(path, bad);
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
}

TEST_F(DiskCache, AnotherKeysEntryAtThisPathIsRejected) {
  // As after a hash collision, or a file copied between caches: the file repeats its key, which must match.
  ASSERT_EQ(other_key.size(), key.size());  // the same length: only the key comparison can tell them apart
  ASSERT_EQ(Store(key, payload), 0);
  ASSERT_EQ(Store(other_key, Bytes(300, 0x42)), 0);
  fs::copy_file(PathOf(other_key), PathOf(key), fs::copy_options::overwrite_existing);
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
  EXPECT_EQ(Load(other_key), TN_DISK_HIT);  // the original is untouched
  // A key of another length, copied over too.
  const std::string longer = key + " --more";
  ASSERT_EQ(Store(longer, payload), 0);
  fs::copy_file(PathOf(longer), PathOf(key), fs::copy_options::overwrite_existing);
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
}

TEST_F(DiskCache, GarbageFileIsRejected) {
  const std::string path = PathOf(key);
  Bytes garbage(4096);
  for (size_t i = 0; i < garbage.size(); i++) garbage[i] = (unsigned char)((i * 2654435761u) >> 13);
  WriteFile(path, garbage);
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
  // Text that is not an entry (for example a stray note left in the directory).
  const std::string text = "not a cache entry\n";
  WriteFile(path, Bytes(text.begin(), text.end()));
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
  // A valid entry whose header claims an absurd payload length must be refused, not allocated.
  ASSERT_EQ(Store(key, payload), 0);
  Bytes huge = ReadFile(path);
  ASSERT_GE(huge.size(), 24u);
  for (int i = 0; i < 8; i++) huge[16 + i] = 0xFF;
  WriteFile(path, huge);
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
}

TEST_F(DiskCache, ZeroLengthFileIsRejected) {
  WriteFile(PathOf(key), Bytes());
  ASSERT_TRUE(fs::exists(PathOf(key)));
  EXPECT_EQ(Load(key), TN_DISK_REJECTED);
}

TEST_F(DiskCache, StoreIsAtomicAndCreatesParents) {
  ASSERT_EQ(Store(key, payload), 0);
  ASSERT_EQ(Store(other_key, payload), 0);
  ASSERT_EQ(Store(key, Bytes(10, 1)), 0);  // a replacement goes through a temporary file too
  // Only the two entries: no temporary file is left behind.
  std::vector<std::string> want = {fs::path(PathOf(key)).filename().string(),
                                   fs::path(PathOf(other_key)).filename().string()};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(ListDir(dir), want);
  for (const std::string &name : ListDir(dir)) EXPECT_EQ(name.find(".tmp"), std::string::npos) << name;
  // An entry is readable by others sharing the cache (mkstemp alone would leave it 0600).
  struct stat st;
  ASSERT_EQ(stat(PathOf(key).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);

  // A directory whose parents do not exist yet is created, parents included.
  const std::string nested = dir + "/a/b/c";
  ASSERT_FALSE(fs::exists(dir + "/a"));
  ASSERT_EQ(Store(nested, key, payload), 0);
  EXPECT_TRUE(fs::is_directory(nested));
  Bytes got;
  EXPECT_EQ(Load(nested, key, &got), TN_DISK_HIT);
  EXPECT_EQ(got, payload);
  EXPECT_EQ(ListDir(nested).size(), 1u);

  // A directory that cannot be created (its parent is a file) fails with -1, leaving nothing behind.
  WriteFile(dir + "/plainfile", Bytes(3, 0));
  EXPECT_EQ(Store(dir + "/plainfile/sub", key, payload), -1);
  EXPECT_TRUE(fs::is_regular_file(dir + "/plainfile"));
}

TEST_F(DiskCache, DirectoryFromEnvironment) {
  EnvGuard xdg("XDG_CACHE_HOME"), home("HOME");  // TNORM_CACHE_DIR is restored by the fixture
  char out[4096];
  auto Dir = [&](size_t capacity = sizeof out) -> std::pair<int, std::string> {
    memset(out, 'z', sizeof out);
    int r = tn_disk_cache_dir(out, capacity);
    return {r, std::string(out)};
  };
  setenv("XDG_CACHE_HOME", "/xdg/cache", 1);
  setenv("HOME", "/home/someone", 1);

  // TNORM_CACHE_DIR first, as given.
  setenv("TNORM_CACHE_DIR", "/opt/kernels/cache", 1);
  EXPECT_EQ(Dir(), std::make_pair(1, std::string("/opt/kernels/cache")));
  // Empty: the disk cache is off, whatever else is set.
  setenv("TNORM_CACHE_DIR", "", 1);
  EXPECT_EQ(Dir(), std::make_pair(0, std::string()));
  // Unset: $XDG_CACHE_HOME/tnorm.
  unsetenv("TNORM_CACHE_DIR");
  EXPECT_EQ(Dir(), std::make_pair(1, std::string("/xdg/cache/tnorm")));
  // No usable XDG_CACHE_HOME (unset, empty, or relative, which the XDG spec says to ignore): $HOME/.cache/tnorm.
  for (const char *x : {(const char *)nullptr, "", "relative/dir"}) {
    SCOPED_TRACE(x != nullptr ? x : "(unset)");
    if (x != nullptr)
      setenv("XDG_CACHE_HOME", x, 1);
    else
      unsetenv("XDG_CACHE_HOME");
    EXPECT_EQ(Dir(), std::make_pair(1, std::string("/home/someone/.cache/tnorm")));
  }
  // Nothing to name a directory with: 0 and "".
  unsetenv("XDG_CACHE_HOME");
  unsetenv("HOME");
  EXPECT_EQ(Dir(), std::make_pair(0, std::string()));
  // A directory that does not fit the buffer is refused rather than cut short.
  setenv("TNORM_CACHE_DIR", "/a/long/enough/path", 1);
  EXPECT_EQ(Dir(8), std::make_pair(0, std::string()));
  EXPECT_EQ(Dir(), std::make_pair(1, std::string("/a/long/enough/path")));
}

// ------------------------------------------------------------------------------------------------
// KernelRegistry: keys, names and row shapes (pure), then builds with NVRTC through the disk cache.
// ------------------------------------------------------------------------------------------------

std::string KernelName(tn_kernel_key k) {
  char name[128];
  tn_kernel_name(k, name, sizeof name);
  return name;
}

TEST(KernelRegistry, KeysRoundTripAndNamesAreUnique) {
  std::set<std::string> names;
  std::set<std::tuple<int, int, int, int>> keys;
  std::map<int, std::string> family_prefix;
  const std::regex name_form("(tn_[a-z_]+)_(registers|staged|wide)<[0-9]+,([0-9]+),[0-9]+(,2)?>");
  const std::regex elementwise_form("(tn_elementwise)<[0-9]+,([0-9]+),[0-9]+>");
  for (int i = 0; i < TN_KERNEL_VARIANTS; i++) {
    SCOPED_TRACE(i);
    tn_kernel_key k = tn_kernel_key_at(i);
    EXPECT_GE((int)k.family, 0);
    EXPECT_LT((int)k.family, TN_FAMILY_COUNT);
    EXPECT_GE((int)k.dtype, 0);
    EXPECT_LT((int)k.dtype, TN_DTYPE_COUNT);
    const bool elementwise = k.family == TN_FAMILY_ELEMENTWISE;
    EXPECT_GE(k.shape, 0);
    EXPECT_LT(k.shape, elementwise ? TN_KERNEL_ELEMENTWISE_COUNT : TN_SHAPE_COUNT);
    EXPECT_GE(k.mode, 0);
    EXPECT_LT(k.mode, TN_KERNEL_MODE_COUNT);
    EXPECT_EQ(tn_kernel_key_index(k), i);
    keys.insert({(int)k.family, (int)k.dtype, k.shape, k.mode});
    std::string name = KernelName(k);
    // A name expression NVRTC can look up: prefix_registers<dtype,threads,mode> or prefix_staged<...>;
    // tn_elementwise<dtype,op,mode> for the elementwise family.
    std::smatch m;
    if (elementwise) {
      ASSERT_TRUE(std::regex_match(name, m, elementwise_form)) << name;
      EXPECT_EQ(std::stoi(m[2].str()), k.shape) << name;
    } else {
      ASSERT_TRUE(std::regex_match(name, m, name_form)) << name;
      const bool pair = tn_kernel_shape_is_pair(k.shape);
      EXPECT_EQ(m[2] == "registers", k.shape < TN_SHAPE_REGISTER_COUNT || pair) << name;
      EXPECT_EQ(m[4] == ",2", pair) << name;  // a pair shape names its two chunks a thread
      EXPECT_EQ(m[2] == "wide", (bool)tn_kernel_shape_is_wide(k.shape)) << name;
      if (m[2] != "staged") EXPECT_EQ(std::stoi(m[3].str()), tn_kernel_group_threads(k.shape)) << name;
    }
    // One prefix per family, whatever the dtype, shape and mode.
    auto seen = family_prefix.emplace((int)k.family, m[1].str());
    EXPECT_EQ(seen.first->second, m[1].str()) << "family " << (int)k.family;
    names.insert(name);
  }
  EXPECT_EQ(keys.size(), (size_t)TN_KERNEL_VARIANTS);   // every key once
  EXPECT_EQ(names.size(), (size_t)TN_KERNEL_VARIANTS);  // two keys never share a kernel
  std::set<std::string> prefixes;
  for (const auto &f : family_prefix) prefixes.insert(f.second);
  EXPECT_EQ(prefixes.size(), (size_t)TN_FAMILY_COUNT);  // each family its own kernels
  // The name the header documents: bf16, 128 threads per row, vector access.
  tn_kernel_key k = {TN_FAMILY_NORM, TN_BF16, 7, TN_KERNEL_MODE_VECTORS};
  EXPECT_EQ(KernelName(k), "tn_norm_registers<2,128,2>");
}

TEST(KernelRegistry, EveryRowFamilyHasWholeChunkKernels) {
  // Rows without a partial chunk (every model's hidden and head sizes) take TN_KERNEL_MODE_WHOLE's kernels,
  // which every row family has; the elementwise family has none. Vectors and bytes are everyone's.
  for (int f = 0; f < TN_FAMILY_COUNT; f++) {
    SCOPED_TRACE(f);
    const tn_kernel_family family = (tn_kernel_family)f;
    EXPECT_EQ((bool)tn_kernel_family_has_mode(family, TN_KERNEL_MODE_WHOLE), family != TN_FAMILY_ELEMENTWISE);
    EXPECT_TRUE(tn_kernel_family_has_mode(family, TN_KERNEL_MODE_VECTORS));
    EXPECT_TRUE(tn_kernel_family_has_mode(family, TN_KERNEL_MODE_BYTES));
    EXPECT_FALSE(tn_kernel_family_has_mode(family, TN_KERNEL_MODE_COUNT));
  }
  tn_kernel_key k = {TN_FAMILY_LAYER, TN_BF16, 7, TN_KERNEL_MODE_WHOLE};
  EXPECT_EQ(KernelName(k), "tn_layer_registers<2,128,3>");
  EXPECT_EQ(tn_kernel_key_at(tn_kernel_key_index(k)).mode, TN_KERNEL_MODE_WHOLE);
}

TEST(KernelRegistry, RopeWholeChunkKernelsAreThePairedOnes) {
  // rope.cu's whole-chunk kernels are the paired ones, launched as a register row kernel of the same G
  // (TN_KERNEL_BLOCK_OF(G) threads, their __launch_bounds__); its slot kernels take up to
  // TN_KERNEL_ROPE_MAX_BLOCK threads. The occupancy the backend asks for uses these block sizes.
  for (int shape = 0; shape < TN_ROPE_SHAPE_COUNT; shape++) {
    SCOPED_TRACE(shape);
    const int g = tn_kernel_group_threads(shape);
    for (int mode : {TN_KERNEL_MODE_BYTES, TN_KERNEL_MODE_VECTORS, TN_KERNEL_MODE_WHOLE}) {
      const tn_kernel_key k = {TN_FAMILY_ROPE, TN_BF16, shape, mode};
      ASSERT_TRUE(tn_kernel_family_has(TN_FAMILY_ROPE, shape, mode));
      EXPECT_EQ(tn_kernel_key_block_threads(k),
                mode == TN_KERNEL_MODE_WHOLE ? TN_KERNEL_BLOCK_OF(g) : TN_KERNEL_ROPE_MAX_BLOCK);
    }
  }
  EXPECT_FALSE(tn_kernel_family_has(TN_FAMILY_ROPE, TN_ROPE_SHAPE_COUNT, TN_KERNEL_MODE_WHOLE));  // G <= 32
  tn_kernel_key k = {TN_FAMILY_ROPE, TN_BF16, 2, TN_KERNEL_MODE_WHOLE};
  EXPECT_EQ(KernelName(k), "tn_rope_registers<2,4,3>");
}

TEST(KernelRegistry, RopePairedGroupHoldsAHeadInFourChunksAThread) {
  // rope.cu's paired kernels put a head of `chunks` chunks on TN_KERNEL_ROPE_PAIRED_GROUP(G, chunks)
  // threads of four chunks: the fewest that hold it so, and G or G / 2, where G is rms_norm's row shape
  // for the head (the kernel folds two lanes of G into a thread, so a lane's chunks must fit two).
  for (tn_dtype dt : {TN_F32, TN_BF16}) {
    const int64_t per_chunk = tn_kernel_chunk_elements(dt);
    for (int64_t dim = per_chunk; dim <= TN_ROPE_MAX_DIM; dim += per_chunk) {
      SCOPED_TRACE(std::string(tn_dtype_name(dt)) + " dim " + std::to_string(dim));
      const int64_t chunks = dim / per_chunk;
      const int g = tn_kernel_group_threads(tn_kernel_row_shape(dt, dim, (size_t)1 << 30));
      const int gr = TN_KERNEL_ROPE_PAIRED_GROUP(g, chunks);
      int fewest = 1;
      while ((int64_t)fewest * TN_KERNEL_REG_CHUNKS < chunks) fewest *= 2;
      EXPECT_EQ(gr, fewest);
      EXPECT_TRUE(gr == g || 2 * gr == g) << "G " << g;
      if (2 * gr == g) {
        EXPECT_LE(chunks, (int64_t)2 * g) << "two lanes of G fold into one thread's four chunks";
      }
    }
  }
}

// A 128-element f16/bf16 row (a head, 16 chunks) has a register shape of its own G = 8 in layer_norm's
// family, which measured faster so, in add_layer_norm's (which must reduce it as layer_norm does) and in
// general.cu's (which has norm_x's G for every row); general.cu's G = 16 holds a float32 head of 128
// (32 chunks). The backend takes the family's smallest shape at or above the row's.
TEST(KernelRegistry, ShortRowShapesOfTheLaterFamilies) {
  const int head = tn_kernel_row_shape(TN_BF16, 128, (size_t)1 << 30);
  ASSERT_EQ(tn_kernel_group_threads(head), 8);
  const int mode = TN_KERNEL_MODE_WHOLE;
  EXPECT_TRUE(tn_kernel_family_has(TN_FAMILY_LAYER, head, mode));
  EXPECT_TRUE(tn_kernel_family_has(TN_FAMILY_GENERAL, head, mode));
  EXPECT_TRUE(tn_kernel_family_has(TN_FAMILY_GENERAL, head + 1, mode));
  EXPECT_EQ(tn_kernel_row_shape(TN_F32, 128, (size_t)1 << 30), head + 1);
  EXPECT_TRUE(tn_kernel_family_has(TN_FAMILY_ADD_LAYER, head, mode));
  EXPECT_FALSE(tn_kernel_family_has(TN_FAMILY_ADD_LAYER, head - 1, mode));
  EXPECT_EQ(tn_kernel_group_threads(head + 1), 16);
  // Every shape a family has is in the key space and named once (KeysRoundTripAndNamesAreUnique).
  int layer = 0, add_layer = 0;
  for (int s = 0; s < TN_SHAPE_COUNT; s++) {
    layer += tn_kernel_family_has(TN_FAMILY_LAYER, s, mode);
    add_layer += tn_kernel_family_has(TN_FAMILY_ADD_LAYER, s, mode);
  }
  EXPECT_EQ(layer, add_layer);
}

TEST(KernelRegistry, RowShapeDependsOnDtypeAndDimOnly) {
  // The threads per row fix the reduction order, so a row's bytes must not depend on the device: for one
  // (dtype, dim) the group size is the same whatever shared memory the device offers, and rows held in
  // registers get the very same shape. f16 and bf16 (both 2 bytes) share their shapes.
  const size_t stage_limits[] = {0, 48 * 1024, 99 * 1024, 227 * 1024, (size_t)1 << 30};
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    for (int64_t dim : {1, 2, 7, 8, 9, 64, 100, 1000, 4096, 5120, 8192, 16384, 16385, 32768, 32769, 65536,
                        131072, 1 << 20}) {
      SCOPED_TRACE(std::string(tn_dtype_name(dt)) + " dim " + std::to_string(dim));
      const int first = tn_kernel_row_shape(dt, dim, stage_limits[0]);
      for (size_t limit : stage_limits) {
        const int s = tn_kernel_row_shape(dt, dim, limit);
        EXPECT_EQ(tn_kernel_group_threads(s), tn_kernel_group_threads(first)) << "limit " << limit;
        if (first < TN_SHAPE_REGISTER_COUNT) {
          EXPECT_EQ(s, first) << "limit " << limit;
        }
      }
      if (dt != TN_F32) {
        EXPECT_EQ(tn_kernel_row_shape(TN_F16, dim, 48 * 1024), tn_kernel_row_shape(TN_BF16, dim, 48 * 1024));
      }
    }
  }
}

TEST(KernelRegistry, RowShapesGrowWithDim) {
  struct Case {
    tn_dtype dtype;
    int64_t per_chunk;     // elements per 16-byte chunk
    int64_t register_max;  // the longest row kept in registers
  };
  const size_t big = (size_t)1 << 30;
  for (Case c : {Case{TN_BF16, 8, 32768}, Case{TN_F16, 8, 32768}, Case{TN_F32, 4, 16384}}) {
    SCOPED_TRACE(tn_dtype_name(c.dtype));
    int previous = -1;
    for (int64_t dim = 1; dim <= c.register_max + 1000; dim++) {
      const int s = tn_kernel_row_shape(c.dtype, dim, big);
      ASSERT_GE(s, previous) << "dim " << dim;  // never fewer threads for a longer row
      previous = s;
      if (dim <= c.register_max) {
        ASSERT_LT(s, TN_SHAPE_REGISTER_COUNT) << "dim " << dim;
        // The group holds the row in TN_KERNEL_CHUNKS_OF(G) chunks per thread, and half of it would not.
        const int g = tn_kernel_group_threads(s);
        ASSERT_GE((int64_t)g * TN_KERNEL_CHUNKS_OF(g) * c.per_chunk, dim) << "dim " << dim;
        if (s > 0) {
          ASSERT_LT((int64_t)(g / 2) * TN_KERNEL_CHUNKS_OF(g / 2) * c.per_chunk, dim) << "dim " << dim;
        }
      } else {
        ASSERT_EQ(s, TN_SHAPE_SHARED) << "dim " << dim;
      }
    }
    EXPECT_EQ(tn_kernel_row_shape(c.dtype, 1, big), 0);
    // Two chunks a thread up to G = 16, four from G = 32: rows of 16 and 32 chunks on 8 and 16 threads,
    // of 33 .. 128 on 32.
    EXPECT_EQ(tn_kernel_group_threads(tn_kernel_row_shape(c.dtype, 16 * c.per_chunk, big)), 8);
    EXPECT_EQ(tn_kernel_group_threads(tn_kernel_row_shape(c.dtype, 32 * c.per_chunk, big)), 16);
    EXPECT_EQ(tn_kernel_group_threads(tn_kernel_row_shape(c.dtype, 32 * c.per_chunk + 1, big)), 32);
    EXPECT_EQ(tn_kernel_group_threads(tn_kernel_row_shape(c.dtype, 128 * c.per_chunk, big)), 32);
    EXPECT_EQ(tn_kernel_row_shape(c.dtype, c.register_max, big), TN_SHAPE_REGISTER_COUNT - 1);
    EXPECT_EQ(tn_kernel_group_threads(TN_SHAPE_REGISTER_COUNT - 1), TN_KERNEL_MAX_GROUP);

    // Above the register limit the row is staged: in shared memory when its chunks fit max_stage_bytes,
    // else read again. The boundary is exact: 16 bytes per chunk.
    const int64_t dim = c.register_max + 1;
    const size_t need = (size_t)((dim + c.per_chunk - 1) / c.per_chunk) * 16;
    EXPECT_EQ(tn_kernel_row_shape(c.dtype, dim, need), TN_SHAPE_SHARED);
    EXPECT_EQ(tn_kernel_row_shape(c.dtype, dim, need - 1), TN_SHAPE_REREAD);
    EXPECT_EQ(tn_kernel_row_shape(c.dtype, dim, 0), TN_SHAPE_REREAD);
    EXPECT_EQ(tn_kernel_row_shape(c.dtype, 1 << 24, 227 * 1024), TN_SHAPE_REREAD);
    EXPECT_EQ(tn_kernel_group_threads(TN_SHAPE_SHARED), TN_KERNEL_MAX_GROUP);
    EXPECT_EQ(tn_kernel_group_threads(TN_SHAPE_REREAD), TN_KERNEL_MAX_GROUP);
  }
  // A block holds whole groups.
  for (int s = 0; s < TN_SHAPE_COUNT; s++) {
    SCOPED_TRACE(s);
    const int g = tn_kernel_group_threads(s);
    if (tn_kernel_shape_is_wide(s)) {
      // One row per block of 4 G threads (at most 1024), the group being its first G.
      EXPECT_EQ(tn_kernel_block_threads(s), std::min(4 * g, 1024));
      EXPECT_EQ(tn_kernel_rows_per_block(s), 1);
      continue;
    }
    // A group wider than a warp is one row per block; narrower groups share TN_KERNEL_MIN_BLOCK threads.
    EXPECT_EQ(tn_kernel_block_threads(s), g > 32 ? g : TN_KERNEL_MIN_BLOCK);
    EXPECT_EQ(tn_kernel_block_threads(s) % tn_kernel_group_threads(s), 0);
    EXPECT_EQ(tn_kernel_rows_per_block(s), tn_kernel_block_threads(s) / g);
  }
  // The register shapes with G = 64 .. 512 have a wide form of the same G; the others none.
  int wide_forms = 0;
  for (int s = 0; s < TN_SHAPE_COUNT; s++) {
    const int w = tn_kernel_wide_shape(s);
    if (w < 0) continue;
    wide_forms++;
    EXPECT_LT(s, TN_SHAPE_REGISTER_COUNT);
    EXPECT_TRUE(tn_kernel_shape_is_wide(w));
    EXPECT_EQ(tn_kernel_group_threads(w), tn_kernel_group_threads(s));
  }
  EXPECT_EQ(wide_forms, TN_SHAPE_PAIR_FIRST - TN_SHAPE_WIDE_FIRST);
}

// The pair shapes: G = 32 .. 1024 threads of two chunks each, for rows of G + 1 .. 2 G chunks (the fewest
// threads that hold the row so). The first four families and norm_x's have those of G = 32 .. 128, all
// alike (a graph's fusions move an op between them, and the fused op must reduce a row as before); the
// other families none (their rows keep four chunks a thread from G = 32).
TEST(KernelRegistry, PairShapes) {
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    const int64_t per_chunk = tn_kernel_chunk_elements(dt);
    for (int64_t dim = 1; dim <= 2 * TN_KERNEL_MAX_GROUP * per_chunk + 3 * per_chunk; dim++) {
      const int64_t chunks = (dim + per_chunk - 1) / per_chunk;
      const int s = tn_kernel_pair_shape(dt, dim);
      // float32 rows of 65 .. 128 chunks stay on G = 32 (rope.cu's heads of up to TN_ROPE_MAX_DIM elements).
      const bool rope_heads = dt == TN_F32 && chunks > 64 && chunks <= 128;
      if (chunks <= 32 || chunks > 2 * TN_KERNEL_MAX_GROUP || rope_heads) {
        ASSERT_EQ(s, -1) << tn_dtype_name(dt) << " dim " << dim;
        continue;
      }
      ASSERT_TRUE(tn_kernel_shape_is_pair(s)) << tn_dtype_name(dt) << " dim " << dim;
      const int g = tn_kernel_group_threads(s);
      ASSERT_GE(2 * (int64_t)g, chunks) << "dim " << dim;
      ASSERT_LT((int64_t)g, chunks) << "dim " << dim;
      ASSERT_EQ(tn_kernel_block_threads(s), g > 32 ? g : TN_KERNEL_MIN_BLOCK);
      ASSERT_EQ(tn_kernel_wide_shape(s), -1);  // few rows take the pair shape itself
      // add_rms_norm's families have the pair shapes of every G, rms_norm's up to G = 128.
      for (tn_kernel_family f : {TN_FAMILY_NORM, TN_FAMILY_NORM_MUL, TN_FAMILY_NORM_UNWEIGHTED, TN_FAMILY_ADD_NORM,
                                 TN_FAMILY_ADD_NORM_MUL, TN_FAMILY_NORM_X}) {
        const bool add = f == TN_FAMILY_ADD_NORM || f == TN_FAMILY_ADD_NORM_MUL;
        for (int mode : {TN_KERNEL_MODE_BYTES, TN_KERNEL_MODE_ELEMENTS, TN_KERNEL_MODE_VECTORS, TN_KERNEL_MODE_WHOLE}) {
          if (!tn_kernel_family_has_mode(f, mode)) continue;  // norm_x's has no element-access kernels
          ASSERT_EQ((bool)tn_kernel_family_has(f, s, mode), add || g <= 128) << "family " << (int)f << " dim " << dim;
        }
      }
      ASSERT_EQ((bool)tn_kernel_family_has(TN_FAMILY_GENERAL, s, TN_KERNEL_MODE_WHOLE), g == 64) << "dim " << dim;
      for (tn_kernel_family f : {TN_FAMILY_LAYER, TN_FAMILY_ADD_LAYER, TN_FAMILY_ROPE}) {
        ASSERT_FALSE(tn_kernel_family_has(f, s, TN_KERNEL_MODE_WHOLE)) << "family " << (int)f << " dim " << dim;
      }
    }
  }
  // The four-chunk shape of G = 64 held rows of 129 .. 256 chunks: the pair families have none (G = 32's
  // keeps float32 rows of 65 .. 128 chunks).
  for (tn_kernel_family f : {TN_FAMILY_NORM, TN_FAMILY_NORM_MUL, TN_FAMILY_NORM_UNWEIGHTED, TN_FAMILY_ADD_NORM,
                             TN_FAMILY_ADD_NORM_MUL, TN_FAMILY_NORM_X}) {
    EXPECT_TRUE(tn_kernel_family_has(f, 5, TN_KERNEL_MODE_WHOLE)) << "family " << (int)f;
    EXPECT_FALSE(tn_kernel_family_has(f, 6, TN_KERNEL_MODE_WHOLE)) << "family " << (int)f;
    EXPECT_TRUE(tn_kernel_family_has(f, 7, TN_KERNEL_MODE_WHOLE)) << "family " << (int)f;
  }
}

// The reduction order is G's (thread t sums chunks t, t + G, ...), so an op that moves between families
// must find the same G in both for every (dtype, dim), whatever the access mode and the row count: a graph
// fuses add + rms_norm into add_rms_norm (which then takes rms_norm's order: tn_kernel_order_family),
// rms_norm + mul into rms_norm with a multiplicand (norm_x's family to general.cu's in TN_CASTING_LLAMA or on
// a 3-D view), add_rms_norm + mul likewise (in add_rms_norm's own order, or rms_norm's when it was fused),
// l2_norm + scale into norm_x's l2_norm with a scale, and add + layer_norm into add_layer_norm; rope.cu
// reduces a head as rms_norm does; and a call without a weight runs in the unweighted family.
TEST(KernelRegistry, FusedFamiliesTakeTheSameThreadsPerRow) {
  const size_t limit = 227 * 1024;
  auto threads = [&](tn_kernel_family f, tn_dtype dt, int64_t dim, int mode, int few) {
    return tn_kernel_group_threads(tn_kernel_call_shape(f, dt, dim, mode, limit, few));
  };
  // A call of family f in rms_norm's order takes rms_norm's shape, which f must have; its G.
  auto threads_as_rms_norm = [&](tn_kernel_family f, tn_dtype dt, int64_t dim, int mode, int few) {
    const int shape = tn_kernel_call_shape(tn_kernel_order_family(f, 1), dt, dim, mode, limit, few);
    EXPECT_TRUE(tn_kernel_family_has(f, shape, mode)) << "family " << (int)f << " shape " << shape;
    return tn_kernel_group_threads(shape);
  };
  bool orders_differ = false;
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    const int64_t per_chunk = tn_kernel_chunk_elements(dt);
    for (int64_t dim = 1; dim <= 40000; dim += dim < 4200 ? 1 : 37) {
      const int64_t chunks = (dim + per_chunk - 1) / per_chunk;
      // The element-access calls of the later families take their byte kernels (backend.c): the same G.
      for (int mode : {TN_KERNEL_MODE_BYTES, TN_KERNEL_MODE_VECTORS, TN_KERNEL_MODE_WHOLE}) {
        for (int few : {0, 1}) {
          const int g = threads(TN_FAMILY_NORM, dt, dim, mode, few);
          ASSERT_EQ(threads(TN_FAMILY_NORM, dt, dim, TN_KERNEL_MODE_ELEMENTS, few), g) << "dim " << dim;
          for (tn_kernel_family f : {TN_FAMILY_NORM_MUL, TN_FAMILY_NORM_UNWEIGHTED, TN_FAMILY_NORM_X}) {
            ASSERT_EQ(threads(f, dt, dim, mode, few), g)
                << "family " << (int)f << " " << tn_dtype_name(dt) << " dim " << dim << " mode " << mode;
          }
          for (tn_kernel_family f : {TN_FAMILY_ADD_NORM, TN_FAMILY_ADD_NORM_MUL}) {
            ASSERT_EQ(threads_as_rms_norm(f, dt, dim, mode, few), g)
                << "family " << (int)f << " " << tn_dtype_name(dt) << " dim " << dim << " mode " << mode;
          }
          // add_rms_norm + mul -> add_rms_norm with a multiplicand, in add_rms_norm's own order.
          const int add_g = threads(TN_FAMILY_ADD_NORM, dt, dim, mode, few);
          ASSERT_EQ(threads(TN_FAMILY_ADD_NORM_MUL, dt, dim, mode, few), add_g) << tn_dtype_name(dt) << " dim " << dim;
          // Its own order is rms_norm's but on rows of 257 .. 2048 chunks (pairs there).
          ASSERT_EQ(add_g == g, chunks <= 256 || chunks > 2048) << tn_dtype_name(dt) << " dim " << dim;
          orders_differ = orders_differ || add_g != g;
          if (dim <= TN_ROPE_MAX_DIM) {
            ASSERT_EQ(threads(TN_FAMILY_ROPE, dt, dim, mode, few), g) << tn_dtype_name(dt) << " dim " << dim;
          }
          ASSERT_EQ(threads(TN_FAMILY_GENERAL, dt, dim, mode, few), g) << tn_dtype_name(dt) << " dim " << dim;
          // add + layer_norm -> add_layer_norm.
          ASSERT_EQ(threads(TN_FAMILY_ADD_LAYER, dt, dim, mode, few), threads(TN_FAMILY_LAYER, dt, dim, mode, few))
              << tn_dtype_name(dt) << " dim " << dim << " mode " << mode;
        }
      }
    }
  }
  EXPECT_TRUE(orders_differ);
  const tn_kernel_key k = {TN_FAMILY_ADD_NORM, TN_BF16, tn_kernel_pair_shape(TN_BF16, 2048), TN_KERNEL_MODE_WHOLE};
  EXPECT_EQ(KernelName(k), "tn_add_norm_registers<2,128,3,2>");
  const tn_kernel_key wide = {TN_FAMILY_ADD_NORM, TN_BF16, tn_kernel_pair_shape(TN_BF16, 4096), TN_KERNEL_MODE_WHOLE};
  EXPECT_EQ(KernelName(wide), "tn_add_norm_registers<2,256,3,2>");
  EXPECT_EQ(tn_kernel_key_index(tn_kernel_key_at(tn_kernel_key_index(k))), tn_kernel_key_index(k));
}

// A cheap kernel to build: bf16 rows of at most 32 elements, one thread each, byte access.
const tn_kernel_key kSmallKey = {TN_FAMILY_NORM, TN_BF16, 0, TN_KERNEL_MODE_BYTES};

tn_kernel_cache_stats Stats() {
  tn_kernel_cache_stats s;
  memset(&s, 0, sizeof s);
  tn_kernel_cache_stats_get(&s);
  return s;
}

// The counters that moved between two snapshots, for readable failures.
struct StatsDelta {
  uint64_t compiled, loaded_from_disk, disk_writes, disk_rejected;
};
StatsDelta Delta(const tn_kernel_cache_stats &before, const tn_kernel_cache_stats &after) {
  return {after.compiled - before.compiled, after.loaded_from_disk - before.loaded_from_disk,
          after.disk_writes - before.disk_writes, after.disk_rejected - before.disk_rejected};
}
std::ostream &operator<<(std::ostream &o, const StatsDelta &d) {
  return o << "compiled +" << d.compiled << ", loaded_from_disk +" << d.loaded_from_disk << ", disk_writes +"
           << d.disk_writes << ", disk_rejected +" << d.disk_rejected;
}
bool operator==(const StatsDelta &a, const StatsDelta &b) {
  return a.compiled == b.compiled && a.loaded_from_disk == b.loaded_from_disk && a.disk_writes == b.disk_writes &&
         a.disk_rejected == b.disk_rejected;
}

// A built kernel's lowered name and cubin, copied out of the library's blob.
struct Built {
  std::string lowered;
  Bytes cubin;
};

class KernelRegistryBuild : public CacheDirTest {
 protected:
  void SetUp() override {
    CacheDirTest::SetUp();
    ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  }
  void TearDown() override {
    tn_context_destroy(ctx);
    CacheDirTest::TearDown();
  }

  // Builds key for arch, checks the binary's form and the change in the counters.
  Built Build(tn_kernel_key key, int arch, StatsDelta want) {
    Built b;
    tn_kernel_binary bin;
    memset(&bin, 0, sizeof bin);
    const tn_kernel_cache_stats before = Stats();
    tn_status st = tn_kernel_build(ctx, key, arch, &bin);
    const StatsDelta got = Delta(before, Stats());
    EXPECT_EQ(st, TN_OK) << tn_context_last_error(ctx);
    if (st != TN_OK) return b;
    EXPECT_EQ(got, want);
    EXPECT_NE(bin.lowered_name, nullptr);
    EXPECT_NE(bin.cubin, nullptr);
    if (bin.lowered_name != nullptr) b.lowered = bin.lowered_name;
    if (bin.cubin != nullptr) b.cubin.assign((const unsigned char *)bin.cubin, (const unsigned char *)bin.cubin + bin.cubin_size);
    EXPECT_FALSE(b.lowered.empty());
    // The blob is the lowered name, its NUL, then the cubin.
    EXPECT_EQ(bin.size, b.lowered.size() + 1 + bin.cubin_size);
    // A cubin is an ELF file for the CUDA machine (e_machine EM_CUDA = 190, little-endian).
    EXPECT_GT(b.cubin.size(), 64u);
    if (b.cubin.size() > 20) {
      EXPECT_EQ(b.cubin[0], 0x7f);
      EXPECT_EQ(b.cubin[1], 'E');
      EXPECT_EQ(b.cubin[2], 'L');
      EXPECT_EQ(b.cubin[3], 'F');
      EXPECT_EQ(b.cubin[18] | (b.cubin[19] << 8), 190);
    }
    tn_kernel_binary_free(&bin);
    EXPECT_EQ(bin.blob, nullptr);
    return b;
  }

  // The single cache entry in the directory.
  std::string OnlyEntry() {
    std::vector<std::string> names = ListDir(dir);
    EXPECT_EQ(names.size(), 1u);
    return names.empty() ? std::string() : dir + "/" + names[0];
  }

  tn_context *ctx = nullptr;
};

TEST_F(KernelRegistryBuild, CompilesOnceThenReadsFromDisk) {
  ASSERT_TRUE(ListDir(dir).empty());
  const Built first = Build(kSmallKey, 90, {1, 0, 1, 0});
  if (HasFailure()) return;
  EXPECT_NE(first.lowered.find("tn_norm_registers"), std::string::npos) << first.lowered;  // mangled, names the template
  const std::string entry = OnlyEntry();
  EXPECT_EQ(fs::path(entry).extension(), ".cubin");
  // The entry holds the binary (the cubin and the name), plus its header and key.
  EXPECT_GT(fs::file_size(entry), first.cubin.size() + first.lowered.size());

  const Built second = Build(kSmallKey, 90, {0, 1, 0, 0});
  EXPECT_EQ(second.lowered, first.lowered);
  EXPECT_EQ(second.cubin, first.cubin);
  EXPECT_EQ(ListDir(dir).size(), 1u);
}

TEST_F(KernelRegistryBuild, CorruptEntryIsRejectedAndRewritten) {
  const Built first = Build(kSmallKey, 90, {1, 0, 1, 0});
  if (HasFailure()) return;
  const std::string entry = OnlyEntry();
  Bytes bytes = ReadFile(entry);
  ASSERT_GT(bytes.size(), 100u);
  bytes[bytes.size() / 2] ^= 0x40;
  WriteFile(entry, bytes);

  // Rejected, compiled again and stored again: the same binary as before.
  const Built rebuilt = Build(kSmallKey, 90, {1, 0, 1, 1});
  EXPECT_EQ(rebuilt.lowered, first.lowered);
  EXPECT_EQ(rebuilt.cubin, first.cubin);
  // The rewritten file is valid: the next build reads it.
  EXPECT_NE(ReadFile(entry), bytes);
  EXPECT_EQ(OnlyEntry(), entry);
  const Built reread = Build(kSmallKey, 90, {0, 1, 0, 0});
  EXPECT_EQ(reread.cubin, first.cubin);
}

TEST_F(KernelRegistryBuild, ArchitectureIsPartOfTheKey) {
  const Built sm90 = Build(kSmallKey, 90, {1, 0, 1, 0});
  if (HasFailure()) return;
  // sm_80 is not served from sm_90's entry: compiled, in a file of its own.
  const Built sm80 = Build(kSmallKey, 80, {1, 0, 1, 0});
  EXPECT_NE(sm80.cubin, sm90.cubin);
  EXPECT_EQ(ListDir(dir).size(), 2u);
  // Both entries stay usable.
  EXPECT_EQ(Build(kSmallKey, 90, {0, 1, 0, 0}).cubin, sm90.cubin);
  EXPECT_EQ(Build(kSmallKey, 80, {0, 1, 0, 0}).cubin, sm80.cubin);
}

TEST_F(KernelRegistryBuild, EveryFamilyBuildsItsOwnKernel) {
  // Each family's name must be a kernel its source defines (else NVRTC fails to look it up), and two
  // families must not be served by one kernel: their lowered names differ and carry their own prefix.
  std::set<std::string> lowered;
  for (int f = 0; f < TN_FAMILY_COUNT; f++) {
    tn_kernel_key key = kSmallKey;
    key.family = (tn_kernel_family)f;
    const std::string name = KernelName(key);
    SCOPED_TRACE(name);
    const Built b = Build(key, 90, {1, 0, 1, 0});
    if (b.lowered.empty()) continue;
    const std::string templ = name.substr(0, name.find('<'));  // "tn_norm_registers"
    EXPECT_NE(b.lowered.find(std::to_string(templ.size()) + templ), std::string::npos)
        << "lowered name " << b.lowered << " is not of " << templ;  // Itanium mangling: <length><name>
    lowered.insert(b.lowered);
  }
  EXPECT_EQ(lowered.size(), (size_t)TN_FAMILY_COUNT);
  EXPECT_EQ(ListDir(dir).size(), (size_t)TN_FAMILY_COUNT);
}

TEST_F(KernelRegistryBuild, CompileErrorReportsTheLogOnOneLine) {
  const char *source =
      "#include \"params.h\"\n"
      "extern \"C\" __global__ void broken_kernel(int *p) {\n"
      "  int x = ;\n"
      "  p[0] = x\n"
      "}\n";
  tn_kernel_binary bin;
  memset(&bin, 0xAB, sizeof bin);
  tn_kernel_binary untouched;
  memcpy(&untouched, &bin, sizeof bin);
  const tn_kernel_cache_stats before = Stats();
  EXPECT_EQ(tn_kernel_compile_source(ctx, source, "broken_kernel", 90, &bin), TN_ERR_BACKEND);
  const std::string msg = tn_context_last_error(ctx);
  EXPECT_NE(msg.find("NVRTC"), std::string::npos) << msg;
  EXPECT_NE(msg.find("error:"), std::string::npos) << msg;  // from the compiler's log ("tnorm_kernel.cu(3): error: ...")
  EXPECT_NE(msg.find("broken_kernel"), std::string::npos) << msg;  // what failed to compile
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;             // one line, for logs and terminals
  EXPECT_EQ(memcmp(&bin, &untouched, sizeof bin), 0) << "the output was written on a failed compile";
  // Nothing was compiled or cached.
  EXPECT_EQ(Delta(before, Stats()), (StatsDelta{0, 0, 0, 0}));
  EXPECT_TRUE(ListDir(dir).empty());
}

// ------------------------------------------------------------------------------------------------
// CudaUnavailable: the library on a machine without an NVIDIA driver.
// ------------------------------------------------------------------------------------------------

// Whether an NVIDIA driver can be loaded here, asked independently of the library.
bool DriverPresent() {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return false;
  dlclose(lib);
  return true;
}

TEST(CudaUnavailable, LibraryRunsWithoutADriver) {
  tn_context *ctx = nullptr;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  const bool driver = DriverPresent();
  RecordProperty("nvidia_driver", driver ? "present" : "absent");

  const tn_status avail = tn_device_available(ctx, TN_DEVICE_CUDA);
  const std::string reason = tn_context_last_error(ctx);
  if (driver) {
    // A driver may still see no GPU, or be too old: either way the answer is definite and explained.
    EXPECT_TRUE(avail == TN_OK || avail == TN_ERR_UNAVAILABLE) << tn_status_name(avail) << ": " << reason;
    if (avail == TN_ERR_UNAVAILABLE) {
      EXPECT_FALSE(reason.empty());
    } else {
      EXPECT_EQ(reason, "");
    }
  } else {
    EXPECT_EQ(avail, TN_ERR_UNAVAILABLE) << reason;
    EXPECT_NE(reason.find("NVIDIA driver"), std::string::npos) << reason;
    // The failure is remembered: asking again gives the same answer and reason.
    EXPECT_EQ(tn_device_available(ctx, TN_DEVICE_CUDA), TN_ERR_UNAVAILABLE);
    EXPECT_EQ(std::string(tn_context_last_error(ctx)), reason);

    int count = -1;
    EXPECT_EQ(tn_device_count(ctx, TN_DEVICE_CUDA, &count), TN_ERR_UNAVAILABLE);
    EXPECT_EQ(count, 0);
    EXPECT_NE(std::string(tn_context_last_error(ctx)).find("NVIDIA driver"), std::string::npos);

    void *const sentinel = reinterpret_cast<void *>(0x1234);
    void *ptr = sentinel;
    EXPECT_EQ(tn_malloc(ctx, tn_cuda_device(0), 1024, &ptr), TN_ERR_UNAVAILABLE);
    EXPECT_EQ(ptr, sentinel);
    EXPECT_STRNE(tn_context_last_error(ctx), "");

    // An op on tensors labelled CUDA (host buffers here: nothing may touch them).
    std::vector<float> x(4 * 8, 0.5f), y(4 * 8);
    memset(y.data(), 0xFF, y.size() * sizeof(float));
    const std::vector<float> x0 = x;
    const std::vector<unsigned char> y0((unsigned char *)y.data(), (unsigned char *)y.data() + y.size() * 4);
    tn_tensor cx = tn_tensor_on(tn_tensor_2d(x.data(), TN_F32, 4, 8), tn_cuda_device(0));
    tn_tensor cy = tn_tensor_on(tn_tensor_2d(y.data(), TN_F32, 4, 8), tn_cuda_device(0));
    EXPECT_EQ(tn_rms_norm(ctx, &cx, nullptr, 0.0f, 0.0f, &cy), TN_ERR_UNAVAILABLE);
    EXPECT_NE(std::string(tn_context_last_error(ctx)).find("NVIDIA driver"), std::string::npos)
        << tn_context_last_error(ctx);
    EXPECT_EQ(memcmp(y.data(), y0.data(), y0.size()), 0) << "the output was written by a refused op";
    EXPECT_EQ(memcmp(x.data(), x0.data(), x.size() * 4), 0);

    // The CPU on the same context is unaffected.
    int cpus = 0;
    EXPECT_EQ(tn_device_count(ctx, TN_DEVICE_CPU, &cpus), TN_OK);
    EXPECT_EQ(cpus, 1);
    tn_tensor hx = tn_tensor_2d(x.data(), TN_F32, 4, 8), hy = tn_tensor_2d(y.data(), TN_F32, 4, 8);
    EXPECT_EQ(tn_rms_norm(ctx, &hx, nullptr, 0.0f, 0.0f, &hy), TN_OK) << tn_context_last_error(ctx);
    EXPECT_STREQ(tn_context_last_error(ctx), "");
    for (float v : y) EXPECT_EQ(v, 1.0f);  // 0.5 / sqrt(mean(0.25)) is exactly 1
  }

  // The compile-only entry point validates its architecture before touching NVRTC, with or without a GPU.
  int count = -1;
  EXPECT_EQ(tn_cuda_build_kernels(ctx, 5, &count), TN_ERR_VALUE);
  EXPECT_EQ(count, -1);
  EXPECT_NE(std::string(tn_context_last_error(ctx)).find("architecture 5"), std::string::npos)
      << tn_context_last_error(ctx);
  tn_context_destroy(ctx);
}

}  // namespace

#endif  // TNORM_CUDA
