set -u
mkdir -p /tmp/cj; for f in .debs/*.deb; do dpkg -x $f /tmp/cj; done; export LD_LIBRARY_PATH=/tmp/cj/usr/lib/x86_64-linux-gnu
B=build-gpu
[ -x $B/tests/tnorm_cuda_tests ] || { cmake -S . -B $B -DCMAKE_BUILD_TYPE=Release -DTNORM_CUDA=ON -DTNORM_GPU_TESTS=ON -DCJSON_LIBRARY=/tmp/cj/usr/lib/x86_64-linux-gnu/libcjson.so.1 -DCJSON_INCLUDE_DIR=/tmp/cj/usr/include >/dev/null && cmake --build $B -j16 >/dev/null 2>&1; echo rebuilt; }
export TNORM_CACHE_DIR=/tmp/tnorm-rerun-cache
$B/tnorm kernels --arch 90
(cd $B && timeout 250 ctest -R '^cli$' > $OUT/cli.txt 2>&1; echo "cli ctest rc=$?" >> $OUT/cli.txt) &
timeout 200 $B/tests/tnorm_cuda_tests --gtest_brief=1 > $OUT/gpu_tests.txt 2>&1; echo "gpu tests rc=$?"
grep -E '^\[  (PASSED|FAILED)|FAILED|Seed|seed' $OUT/gpu_tests.txt | head -20
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 $B/tests/tnorm_cuda_tests --gtest_brief=1 --gtest_filter='Sanitized*' > $OUT/memcheck.txt 2>&1; echo "memcheck rc=$? $(grep 'ERROR SUMMARY' $OUT/memcheck.txt | tail -1) $(grep -E '^\[  (PASSED|FAILED)' $OUT/memcheck.txt | tr '\n' ' ')"
timeout 120 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 $B/tests/tnorm_cuda_tests --gtest_brief=1 --gtest_filter='SanitizedSmall*' > $OUT/racecheck.txt 2>&1; echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' $OUT/racecheck.txt | tail -1) $(grep -E '^\[  (PASSED|FAILED)' $OUT/racecheck.txt | tr '\n' ' ')"
wait
tail -3 $OUT/cli.txt
