/* libFuzzer target: the .npy reader on any bytes, and the writer on whatever it reads. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char in[4200], out[4200];
  tn_file_tensor t;
  fz_write(fz_path("in.npy", in, sizeof in), data, size);
  if (fz_load(in, &t) == 0) {
    fz_round_trip(&t, fz_path("out.npy", out, sizeof out));
    tn_file_tensor_free(&t);
  }
  return 0;
}
