set -u
mkdir -p /tmp/cj; for f in .debs/*.deb; do dpkg -x $f /tmp/cj; done; export LD_LIBRARY_PATH=/tmp/cj/usr/lib/x86_64-linux-gnu
t0=$(date +%s)
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DTNORM_BUILD_TESTS=OFF -DCJSON_LIBRARY=/tmp/cj/usr/lib/x86_64-linux-gnu/libcjson.so.1 -DCJSON_INCLUDE_DIR=/tmp/cj/usr/include >/dev/null && cmake --build build-gpu -j16 >/dev/null 2>&1 || { echo BUILD FAILED; exit 1; }
export TNORM_CACHE_DIR=/tmp/tnc
S=32768x4096,16384x8192,65536x2048,8192x16384,131072x128,4096x4096,1x4096
timeout 200 build-gpu/tnorm bench --device cuda --ops rms_norm,add_rms_norm,l2_norm --dtypes bf16,f32 --shapes $S --csv $OUT/t.csv > /dev/null
awk -F, 'NR>1 {printf "%s %s %s %.1f%% %.2fus\n", $2, $3, $4"x"$5, $10, $7}' $OUT/t.csv
echo "t=$(( $(date +%s) - t0 ))"
