#!/usr/bin/env bash
# Whole airbench94 runs side by side on this machine: `resnet-cifar train --model airbench` (fp32
# and bf16) and scripts/airbench_reference.py (airbench94's own code on the CPU, bf16 autocast in
# channels_last, its fastest CPU mode; and fp32), alternating, one seed after another, and a table
# of each side's time, validation accuracy (TTA) and peak memory.
#
#   scripts/airbench-vs-pytorch.sh [--seeds "0 1"] [--threads 2] [--sides "ours-bf16 torch-bf16"]
#                                  [--data ../shared/data/cifar10] [--val-split 5000]
#
# Time: ours is the whole process's wall clock (data loading, whitening, training, checkpoints,
# the final evaluation); PyTorch's is airbench's own clock (whitening, training and the final
# evaluation, without loading the data), so the comparison leans PyTorch's way.
# Needs a release build and a Python with torch (PYTHON=..., default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="0" threads=$(nproc) data=../shared/data/cifar10 val=5000
sides="ours-bf16 torch-bf16 ours-fp32 torch-fp32"
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds=$2; shift 2 ;; --threads) threads=$2; shift 2 ;; --sides) sides=$2; shift 2 ;;
    --data) data=$2; shift 2 ;; --val-split) val=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
bin=target/release/resnet-cifar
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
results=$tmp/results.jsonl
for seed in $seeds; do
  for side in $sides; do
    case "$side" in
      ours-*)
        precision=${side#ours-}
        out=$tmp/run-$side-$seed
        /usr/bin/time -f "%e %M" -o "$tmp/time" "$bin" train --model airbench --data "$data" --val-split "$val" \
          --seed "$seed" --threads "$threads" --precision "$precision" --out "$out" >"$tmp/log" 2>&1
        read -r wall rss_kib <"$tmp/time"
        acc=$("$py" -c 'import json,sys; print([r for r in map(json.loads, open(sys.argv[1])) if r["kind"] == "eval"][-1]["accuracy"])' "$out/metrics.jsonl")
        echo "{\"side\": \"$side\", \"seed\": $seed, \"seconds\": $wall, \"accuracy\": $acc, \"peak_mib\": $((rss_kib / 1024))}" >>"$results"
        ;;
      torch-*)
        extra=""
        [ "$side" = torch-bf16 ] && extra="--amp --channels-last"
        OMP_NUM_THREADS=$threads "$py" scripts/airbench_reference.py --data "$data" --val-split "$val" \
          --seed "$seed" --threads "$threads" $extra >"$tmp/log" 2>&1
        tail -1 "$tmp/log" | "$py" -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"side": sys.argv[1], "seed": int(sys.argv[2]), "seconds": r["seconds"],
                  "accuracy": r["tta_accuracy"], "peak_mib": r["peak_rss_mib"]}))' "$side" "$seed" >>"$results"
        ;;
      *) echo "unknown side $side" >&2; exit 2 ;;
    esac
    tail -1 "$results" >&2
  done
done
"$py" - "$results" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$threads" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"airbench94, {sys.argv[2]}, {sys.argv[3]} threads; per side: median time, mean TTA accuracy, peak memory")
print(f"{'side':<12} {'runs':>4} {'seconds':>9} {'accuracy':>9} {'peak MiB':>9}")
for side in dict.fromkeys(r["side"] for r in rows):
    rs = [r for r in rows if r["side"] == side]
    print(f"{side:<12} {len(rs):>4} {statistics.median(r['seconds'] for r in rs):>9.1f} "
          f"{100 * statistics.mean(r['accuracy'] for r in rs):>8.2f}% {max(r['peak_mib'] for r in rs):>9}")
PY
