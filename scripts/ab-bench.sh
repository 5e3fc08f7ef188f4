#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: `tnorm bench` of the working tree beside variants of it, each a patch
# applied to a copy of the tree, built on its own and run in turns (base, v1, v2, base, v1, v2, ...) so
# that the clock and thermal drift of the card falls on every variant alike. For kernel experiments: one
# call answers "does this change help, on which shapes", with the copy ceiling measured in every run.
#   bash scripts/ab-bench.sh 'BENCH ARGS' [PATCH ...]
#   e.g. bash scripts/ab-bench.sh '--ops layer_norm --dtypes bf16 --shapes 32768x4096,8192x16384' exp/a.diff
# Prints, per op, dtype and shape, the % of the copy ceiling of each variant in each round, then the best
# of the rounds. Logs and CSVs go to $OUT (or ./ab-bench-out). ROUNDS (default 2) sets the turns.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/ab-bench-out}
mkdir -p "$OUT"
[ $# -ge 1 ] || { echo "usage: ab-bench.sh 'BENCH ARGS' [PATCH ...]"; exit 2; }
args=$1
shift
ROUNDS=${ROUNDS:-2}
names=(base)
dirs=("$PWD")
for patch in "$@"; do
  [ -f "$patch" ] || { echo "ab-bench: no patch $patch"; exit 2; }
  name=$(basename "$patch" .diff)
  dir=/tmp/ab-bench/$name
  rm -rf "$dir" && mkdir -p "$dir"
  # The tree without its build folders, the patch applied.
  tar --exclude='./build*' --exclude='./.git' --exclude="./$(basename "$OUT")" -cf - . | tar -xf - -C "$dir"
  if ! (cd "$dir" && git apply "$OLDPWD/$patch" 2>"$OUT/$name.apply.txt" || patch -p1 < "$OLDPWD/$patch" >>"$OUT/$name.apply.txt" 2>&1); then
    echo "ab-bench: $patch does not apply"; cat "$OUT/$name.apply.txt"; exit 1
  fi
  names+=("$name")
  dirs+=("$dir")
done

# Each tree built in turn (each variant's kernels are its own: the disk cache keys on the source, so
# variants never read each other's). The base is built in this shell, the others in subshells.
build_tree() {
  (cd "$1" && . scripts/gpu-build.sh tnorm_cli) > "$OUT/$2.build.txt" 2>&1 && return 0
  echo "ab-bench: $2 does not build"
  tail -20 "$OUT/$2.build.txt"
  exit 1
}
. scripts/gpu-build.sh tnorm_cli > "$OUT/base.build.txt" 2>&1 || { echo "ab-bench: base does not build"; tail -20 "$OUT/base.build.txt"; exit 1; }
for i in "${!dirs[@]}"; do
  [ "$i" -eq 0 ] || build_tree "${dirs[$i]}" "${names[$i]}"
done

for r in $(seq 1 "$ROUNDS"); do
  for i in "${!dirs[@]}"; do
    # shellcheck disable=SC2086
    timeout 280 "${dirs[$i]}/build-gpu/tnorm" bench --device cuda $args --csv "$OUT/${names[$i]}.$r.csv" \
      > "$OUT/${names[$i]}.$r.txt" 2>&1 || { echo "ab-bench: ${names[$i]} round $r failed"; tail -5 "$OUT/${names[$i]}.$r.txt"; }
  done
done

python3 - "$OUT" "$ROUNDS" "${names[@]}" <<'EOF'
import csv, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
table, times, ceilings = {}, {}, {}
for n in names:
    for r in range(1, rounds + 1):
        try:
            rows = list(csv.DictReader(open(f"{out}/{n}.{r}.csv")))
        except OSError:
            continue
        for row in rows:
            key = (row["op"], row["dtype"], f'{row["rows"]}x{row["dim"]}')
            table.setdefault(key, {}).setdefault(n, []).append(float(row["pct_ceiling"]))
            times.setdefault(key, {}).setdefault(n, []).append(float(row["time_us"]))
            ceilings.setdefault(n, {})[r] = float(row["ceiling_gbps"])
print("% of the copy ceiling, rounds then best:")
print(f'{"op":<20} {"dtype":<5} {"shape":>12}  ' + "  ".join(f"{n:>22}" for n in names))
for key, cells in table.items():
    line = f"{key[0]:<20} {key[1]:<5} {key[2]:>12}  "
    for n in names:
        v = cells.get(n, [])
        line += "  " + f'{"/".join(f"{x:.1f}" for x in v):>15} {max(v) if v else float("nan"):6.1f}'
    print(line)
# The ceiling moves from run to run, and with it every % of a run: the times show what the % hides.
print("copy ceiling (GB/s) per round: " + "; ".join(
    f'{n} ' + "/".join(f"{ceilings[n][r]:.0f}" for r in sorted(ceilings[n])) for n in names if n in ceilings))
print("time per call (us), best of the rounds:")
for key, cells in times.items():
    line = f"{key[0]:<20} {key[1]:<5} {key[2]:>12}  "
    for n in names:
        v = cells.get(n, [])
        line += f'  {min(v) if v else float("nan"):22.2f}'
    print(line)
EOF
