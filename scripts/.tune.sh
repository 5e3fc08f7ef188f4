set -u
mkdir -p /tmp/cj; for f in .debs/*.deb; do dpkg -x $f /tmp/cj; done; export LD_LIBRARY_PATH=/tmp/cj/usr/lib/x86_64-linux-gnu
t0=$(date +%s)
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTNORM_BUILD_TESTS=OFF -DCJSON_LIBRARY=/tmp/cj/usr/lib/x86_64-linux-gnu/libcjson.so.1 -DCJSON_INCLUDE_DIR=/tmp/cj/usr/include >/dev/null && cmake --build build-gpu -j16 >/dev/null 2>&1 || { echo BUILD FAILED; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export TNORM_CACHE_DIR=/tmp/tnc
S=32768x4096,16384x8192,65536x2048,8192x16384,131072x128,4096x4096
for cfg in "6 4" "8 4"; do
  set -- $cfg
  TNORM_NVRTC_DEFINE=TN_KERNEL_SMALL_BLOCKS=$1 TNORM_CUDA_CHUNKS_PER_THREAD=$2 timeout 100 build-gpu/tnorm bench --device cuda --ops rms_norm,add_rms_norm --dtypes bf16 --shapes $S --csv $OUT/tune_$1_$2.csv > /dev/null
  echo "$1/$2: $(awk -F, 'NR>1 {printf "%s%s %.0f | ", substr($2,1,3), $3, $10}' $OUT/tune_$1_$2.csv)"
done
echo "t=$(( $(date +%s) - t0 ))"
