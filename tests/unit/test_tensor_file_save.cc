// Saving several tensor files all or nothing (tn_file_prepare, tn_file_commit, tn_file_discard), the
// cleanup a signal handler runs (tn_file_remove_pending), and telling whether two specs are one file.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <errno.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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

class TensorFileCommit : public tnorm_test::ScratchDirTest {
 protected:
  void SetUp() override {
    ScratchDirTest::SetUp();
    data_.assign(24, 0.5f);
    std::memset(&t_, 0, sizeof t_);
    t_.dtype = TN_F32;
    t_.ndim = 2;
    t_.rows = 4;
    t_.dim = 6;
    t_.data = data_.data();
  }
  // Prepares a save of t_ to name; the spec may carry a ":TENSOR" tail.
  void Prepare(const std::string &name, tn_file_pending *p) {
    char err[512];
    ASSERT_EQ(tn_file_prepare(Path(name).c_str(), &t_, "t", p, err, sizeof err), 0) << err;
    ASSERT_NE(p->id, 0);
  }
  bool Loads(const std::string &spec) const {
    tn_file_tensor got;
    char err[512];
    if (tn_file_load(Path(spec).c_str(), &got, err, sizeof err) != 0) return false;
    bool ok = got.rows == 4 && got.dim == 6 && std::memcmp(got.data, data_.data(), 24 * sizeof(float)) == 0;
    tn_file_tensor_free(&got);
    return ok;
  }

  std::vector<float> data_;
  tn_file_tensor t_;
};

void ExpectOneLine(const char *err) {
  EXPECT_NE(err[0], '\0');
  EXPECT_EQ(std::strchr(err, '\n'), nullptr) << err;
}

size_t Temporaries(const std::set<std::string> &names) {
  size_t n = 0;
  for (const auto &name : names) n += name.rfind(".tnorm-", 0) == 0;
  return n;
}

TEST_F(TensorFileCommit, PreparedSavesAppearOnlyOnCommit) {
  tn_file_pending p[2] = {{0}, {0}};
  Write("a.npy", "OLD");
  Prepare("a.npy", &p[0]);
  Prepare("b.safetensors:w", &p[1]);
  EXPECT_EQ(Read("a.npy"), "OLD");
  EXPECT_EQ(Temporaries(List()), 2u);
  EXPECT_EQ(List().count("b.safetensors"), 0u);

  char err[512];
  size_t failed = 99;
  ASSERT_EQ(tn_file_commit(p, 2, &failed, err, sizeof err), 0) << err;
  EXPECT_EQ(failed, 2u);
  EXPECT_EQ(p[0].id, 0);
  EXPECT_EQ(p[1].id, 0);
  EXPECT_TRUE(Loads("a.npy"));
  EXPECT_TRUE(Loads("b.safetensors:w"));
  EXPECT_EQ(List(), (std::set<std::string>{"a.npy", "b.safetensors"}));
}

// rename() cannot put a file where a directory is: the commit fails at its last save, after the
// earlier ones were renamed into place, and must put those back.
TEST_F(TensorFileCommit, FailedCommitPutsEveryTargetBack) {
  tn_file_pending p[3] = {{0}, {0}, {0}};
  Write("a.npy", "OLD A");
  ASSERT_EQ(mkdir(Path("d.npy").c_str(), 0755), 0);
  Prepare("a.npy", &p[0]);
  Prepare("new.npy", &p[1]);
  Prepare("d.npy", &p[2]);
  char err[512];
  size_t failed = 99;
  EXPECT_EQ(tn_file_commit(p, 3, &failed, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_NE(std::strstr(err, "d.npy"), nullptr) << err;
  EXPECT_EQ(failed, 2u);
  EXPECT_EQ(p[0].id, 0);
  EXPECT_EQ(p[2].id, 0);
  EXPECT_EQ(Read("a.npy"), "OLD A");
  EXPECT_EQ(List(), (std::set<std::string>{"a.npy", "d.npy"}));  // no new.npy, no temporary, no backup
}

TEST_F(TensorFileCommit, FailedFirstRenameChangesNothing) {
  tn_file_pending p[2] = {{0}, {0}};
  Write("b.npy", "OLD B");
  ASSERT_EQ(mkdir(Path("d.npy").c_str(), 0755), 0);
  Prepare("d.npy", &p[0]);
  Prepare("b.npy", &p[1]);
  char err[512];
  size_t failed = 99;
  EXPECT_EQ(tn_file_commit(p, 2, &failed, err, sizeof err), -1);
  EXPECT_EQ(failed, 0u);
  EXPECT_EQ(Read("b.npy"), "OLD B");
  EXPECT_EQ(List(), (std::set<std::string>{"b.npy", "d.npy"}));
}

TEST_F(TensorFileCommit, ReplacesSymbolicLinkAndPutsItBack) {
  tn_file_pending p[2] = {{0}, {0}};
  Write("real.npy", "REAL");
  ASSERT_EQ(symlink("real.npy", Path("a.npy").c_str()), 0);
  ASSERT_EQ(mkdir(Path("d.npy").c_str(), 0755), 0);
  Prepare("a.npy", &p[0]);
  Prepare("d.npy", &p[1]);
  char err[512];
  EXPECT_EQ(tn_file_commit(p, 2, nullptr, err, sizeof err), -1);
  EXPECT_TRUE(fs::is_symlink(Path("a.npy")));
  EXPECT_EQ(fs::read_symlink(Path("a.npy")), "real.npy");
  EXPECT_EQ(Read("real.npy"), "REAL");
  EXPECT_EQ(List(), (std::set<std::string>{"a.npy", "real.npy", "d.npy"}));
}

// Where a hard link is refused, the previous file is moved aside at commit instead. Linux refuses a
// user a hard link to another user's file it cannot write (fs.protected_hardlinks), so root runs the
// commits as nobody, in a child process, on a file root owns.
TEST_F(TensorFileCommit, WithoutHardLinksThePreviousFileIsMovedAside) {
  std::ifstream protect("/proc/sys/fs/protected_hardlinks");
  int protected_hardlinks = 0;
  protect >> protected_hardlinks;
  if (geteuid() != 0 || protected_hardlinks != 1) GTEST_SKIP() << "needs root and fs.protected_hardlinks = 1";
  ASSERT_EQ(chmod(dir_.c_str(), 0777), 0);
  Write("a.npy", "OLD A");
  ASSERT_EQ(chmod(Path("a.npy").c_str(), 0644), 0);
  ASSERT_EQ(mkdir(Path("d.npy").c_str(), 0755), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    char err[512];
    tn_file_pending p[2] = {{0}, {0}};
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(10);
    if (link(Path("a.npy").c_str(), Path("probe").c_str()) == 0 || errno != EPERM) _exit(11);
    if (tn_file_prepare(Path("a.npy").c_str(), &t_, nullptr, &p[0], err, sizeof err) != 0 ||
        tn_file_prepare(Path("d.npy").c_str(), &t_, nullptr, &p[1], err, sizeof err) != 0)
      _exit(12);
    if (tn_file_commit(p, 2, nullptr, err, sizeof err) != -1 || Read("a.npy") != "OLD A") _exit(13);
    if (List() != std::set<std::string>{"a.npy", "d.npy"}) _exit(14);
    if (tn_file_prepare(Path("a.npy").c_str(), &t_, nullptr, &p[0], err, sizeof err) != 0 ||
        tn_file_prepare(Path("b.npy").c_str(), &t_, nullptr, &p[1], err, sizeof err) != 0 ||
        tn_file_commit(p, 2, nullptr, err, sizeof err) != 0)
      _exit(15);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child's step that failed (see the test)";
  EXPECT_TRUE(Loads("a.npy"));
  EXPECT_TRUE(Loads("b.npy"));
  EXPECT_EQ(List(), (std::set<std::string>{"a.npy", "b.npy", "d.npy"}));
}

TEST_F(TensorFileCommit, CommitRefusesOneFileTwice) {
  tn_file_pending p[2] = {{0}, {0}};
  Write("a.npy", "OLD");
  Prepare("a.npy", &p[0]);
  Prepare("./a.npy", &p[1]);
  char err[512];
  size_t failed = 99;
  EXPECT_EQ(tn_file_commit(p, 2, &failed, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_NE(std::strstr(err, "same file"), nullptr) << err;
  EXPECT_EQ(failed, 1u);
  EXPECT_EQ(Read("a.npy"), "OLD");
  EXPECT_EQ(List(), std::set<std::string>{"a.npy"});
}

TEST_F(TensorFileCommit, CommitRefusesWhatIsNotPrepared) {
  tn_file_pending p[2] = {{0}, {0}};
  Prepare("a.npy", &p[0]);
  char err[512];
  EXPECT_EQ(tn_file_commit(p, 2, nullptr, err, sizeof err), -1);  // p[1] holds nothing
  ExpectOneLine(err);
  EXPECT_EQ(p[0].id, 0);
  EXPECT_TRUE(List().empty());

  Prepare("a.npy", &p[0]);
  p[1] = p[0];  // one save twice
  EXPECT_EQ(tn_file_commit(p, 2, nullptr, err, sizeof err), -1);
  EXPECT_TRUE(List().empty());
  EXPECT_EQ(tn_file_commit(nullptr, 0, nullptr, err, sizeof err), 0);
}

TEST_F(TensorFileCommit, DiscardRemovesTheTemporary) {
  tn_file_pending p = {0};
  tn_file_discard(&p);  // nothing pending
  tn_file_discard(nullptr);
  Prepare("a.npy", &p);
  EXPECT_EQ(Temporaries(List()), 1u);
  tn_file_discard(&p);
  EXPECT_EQ(p.id, 0);
  tn_file_discard(&p);
  EXPECT_TRUE(List().empty());
}

TEST_F(TensorFileCommit, FailedPrepareLeavesNothing) {
  tn_file_pending p = {0};
  char err[512];
  EXPECT_EQ(tn_file_prepare(Path("missing/a.npy").c_str(), &t_, nullptr, &p, err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_EQ(p.id, 0);
  t_.dtype = TN_BF16;
  EXPECT_EQ(tn_file_prepare(Path("a.npy").c_str(), &t_, nullptr, &p, err, sizeof err), -1);
  EXPECT_EQ(tn_file_prepare(Path("a.npy").c_str(), &t_, nullptr, nullptr, err, sizeof err), -1);
  EXPECT_TRUE(List().empty());
}

TEST_F(TensorFileCommit, AtMostSoManyPendingAtOnce) {
  std::vector<tn_file_pending> p(TN_FILE_MAX_PENDING + 1, tn_file_pending{0});
  char err[512];
  for (int i = 0; i < TN_FILE_MAX_PENDING; i++) Prepare("a" + std::to_string(i) + ".npy", &p[i]);
  EXPECT_EQ(tn_file_prepare(Path("z.npy").c_str(), &t_, nullptr, &p.back(), err, sizeof err), -1);
  ExpectOneLine(err);
  for (auto &q : p) tn_file_discard(&q);
  EXPECT_TRUE(List().empty());
  Prepare("z.npy", &p.back());  // the entries are free again
  tn_file_discard(&p.back());
}

TEST_F(TensorFileCommit, RemovePendingRemovesEveryTemporary) {
  tn_file_pending p[2] = {{0}, {0}};
  Write("a.npy", "OLD");
  Prepare("a.npy", &p[0]);
  Prepare("b.npy", &p[1]);
  tn_file_remove_pending();
  EXPECT_EQ(List(), std::set<std::string>{"a.npy"});
  EXPECT_EQ(Read("a.npy"), "OLD");
  tn_file_discard(&p[0]);
  tn_file_discard(&p[1]);
  EXPECT_EQ(List(), std::set<std::string>{"a.npy"});
}

TEST_F(TensorFileCommit, SaveIsPrepareAndCommit) {
  char err[512];
  Write("a.npy", "OLD");
  ASSERT_EQ(tn_file_save(Path("a.npy").c_str(), &t_, nullptr, err, sizeof err), 0) << err;
  EXPECT_TRUE(Loads("a.npy"));
  EXPECT_EQ(List(), std::set<std::string>{"a.npy"});
}

// ------------------------------------------------------------------------------------------------
// Whether two specs are one file
// ------------------------------------------------------------------------------------------------

class TensorFileSameTarget : public TensorFileCommit {
 protected:
  int Same(const std::string &a, const std::string &b) {
    err_[0] = '\0';
    return tn_file_same_target(a.c_str(), b.c_str(), err_, sizeof err_);
  }
  char err_[512];
};

TEST_F(TensorFileSameTarget, SeesThroughSpellingsAndLinks) {
  Write("y.npy", "Y");
  Write("other.npy", "O");
  ASSERT_EQ(link(Path("y.npy").c_str(), Path("hard.npy").c_str()), 0);
  ASSERT_EQ(symlink("y.npy", Path("soft.npy").c_str()), 0);
  ASSERT_EQ(mkdir(Path("sub").c_str(), 0755), 0);
  ASSERT_EQ(symlink(dir_.c_str(), Path("sub/up").c_str()), 0);

  EXPECT_EQ(Same(Path("y.npy"), Path("y.npy")), 1);
  ExpectOneLine(err_);
  EXPECT_NE(std::strstr(err_, "same file"), nullptr) << err_;
  EXPECT_EQ(Same(Path("y.npy"), dir_ + "/./y.npy"), 1);
  EXPECT_EQ(Same(Path("y.npy"), dir_ + "/sub/../y.npy"), 1);
  EXPECT_EQ(Same(Path("y.npy"), Path("hard.npy")), 1);
  EXPECT_EQ(Same(Path("y.npy"), Path("soft.npy")), 1);
  EXPECT_EQ(Same(Path("y.npy"), Path("sub/up/y.npy")), 1);
  // Files that do not exist yet: the same name in the same resolved directory.
  EXPECT_EQ(Same(Path("n.npy"), Path("sub/up/n.npy")), 1);
  EXPECT_EQ(Same(Path("n.safetensors:a"), dir_ + "/./n.safetensors:b"), 1);
  EXPECT_NE(std::strstr(err_, "two files"), nullptr) << err_;

  EXPECT_EQ(Same(Path("y.npy"), Path("other.npy")), 0);
  EXPECT_EQ(err_[0], '\0');
  EXPECT_EQ(Same(Path("n.npy"), Path("m.npy")), 0);
  EXPECT_EQ(Same(Path("n.npy"), Path("sub/n.npy")), 0);
  EXPECT_EQ(Same(Path("y.npy"), Path("y.safetensors")), 0);
  EXPECT_EQ(Same(Path("y.npy"), Path("y.txt")), -1);
  ExpectOneLine(err_);
}

// ------------------------------------------------------------------------------------------------
// Files that are not regular files, and directories where an output would go
// ------------------------------------------------------------------------------------------------

TEST_F(TensorFileCommit, FifoIsRefusedWithoutBlocking) {
  ASSERT_EQ(mkfifo(Path("f.npy").c_str(), 0600), 0);
  // Opening a FIFO for reading blocks until a writer comes; the alarm ends a test that would hang.
  alarm(20);
  tn_file_tensor got;
  char err[512];
  EXPECT_EQ(tn_file_load(Path("f.npy").c_str(), &got, err, sizeof err), -1);
  EXPECT_NE(std::strstr(err, "not a regular file"), nullptr) << err;
  EXPECT_EQ(tn_file_load(Path("f.safetensors:x").c_str(), &got, err, sizeof err), -1);  // not there
  ASSERT_EQ(mkfifo(Path("f.safetensors").c_str(), 0600), 0);
  EXPECT_EQ(tn_file_load(Path("f.safetensors:x").c_str(), &got, err, sizeof err), -1);
  EXPECT_NE(std::strstr(err, "not a regular file"), nullptr) << err;
  alarm(0);
}

TEST_F(TensorFileCommit, CheckDirectoryRefusesADirectoryTarget) {
  char err[512];
  ASSERT_EQ(mkdir(Path("d.npy").c_str(), 0755), 0);
  EXPECT_EQ(tn_file_check_directory(Path("d.npy").c_str(), err, sizeof err), -1);
  ExpectOneLine(err);
  EXPECT_NE(std::strstr(err, "directory"), nullptr) << err;
  EXPECT_EQ(tn_file_check_directory(Path("d.safetensors").c_str(), err, sizeof err), 0) << err;
  EXPECT_EQ(tn_file_check_directory(Path("d.npy/x.npy").c_str(), err, sizeof err), 0) << err;
}

}  // namespace
