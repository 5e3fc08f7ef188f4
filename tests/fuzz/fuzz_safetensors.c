/* libFuzzer target: the safetensors reader on any bytes, asked for the tensor 'w' and for the
 * header's first key (so that mutated names are looked up too), and the writer on whatever it reads. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The text between the first two quotes after the length field: the first key when the header is
 * plain, anything at all otherwise. */
static void first_key(const uint8_t *data, size_t size, char *name, size_t cap) {
  const uint8_t *open = size > 8 ? memchr(data + 8, '"', size - 8) : NULL, *close;
  name[0] = '\0';
  if (!open) return;
  close = memchr(open + 1, '"', size - (size_t)(open + 1 - data));
  if (!close || (size_t)(close - open - 1) >= cap || memchr(open + 1, '\0', (size_t)(close - open - 1))) return;
  memcpy(name, open + 1, (size_t)(close - open - 1));
  name[close - open - 1] = '\0';
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char in[4200], out[4200], spec[4500], key[256];
  const char *names[2];
  tn_file_tensor t;
  fz_path("in.safetensors", in, sizeof in);
  fz_write(in, data, size);
  first_key(data, size, key, sizeof key);
  names[0] = "w";
  names[1] = key;
  for (int k = 0; k < 2; k++) {
    if (!names[k][0] || (k == 1 && strcmp(key, "w") == 0)) continue;
    snprintf(spec, sizeof spec, "%s:%s", in, names[k]);
    if (fz_load(spec, &t) == 0) {
      if (strcmp(t.name, names[k]) != 0) abort();
      snprintf(spec, sizeof spec, "%s:%s", fz_path("out.safetensors", out, sizeof out), names[k]);
      fz_round_trip(&t, spec);
      tn_file_tensor_free(&t);
    }
  }
  return 0;
}
