// A crash in the GPU tests prints the stack before the process dies: the device machine has no debugger,
// and a bare "Segmentation fault" says nothing about where.
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <initializer_list>

namespace {

void PrintStackAndDie(int sig) {
  void *frames[64];
  const int n = backtrace(frames, 64);
  static const char header[] = "\n*** fatal signal in tnorm_cuda_tests; stack:\n";
  (void)!write(STDERR_FILENO, header, sizeof header - 1);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

const bool installed = [] {
  // An alternate stack, so that a stack overflow is reported too.
  static char alt[1 << 16];
  stack_t ss = {};
  ss.ss_sp = alt;
  ss.ss_size = sizeof alt;
  sigaltstack(&ss, nullptr);
  struct sigaction sa = {};
  sa.sa_handler = PrintStackAndDie;
  sa.sa_flags = SA_ONSTACK;
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) sigaction(sig, &sa, nullptr);
  return true;
}();

}  // namespace
