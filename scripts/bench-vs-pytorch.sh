#!/usr/bin/env bash
# Runs `resnet-cifar bench` and ../shared/bench/torch_reference.py alternately, N times each,
# and prints the median images/s of both, their ratio, and the peak memory of each process.
#
#   scripts/bench-vs-pytorch.sh [--stem seed|cifar] [--runs 5] [--steps 20] [--threads 2] [--batch 64]
#                               [--channels-last]   (PyTorch in its channels_last layout)
#                               [--precision bf16]  (ours with bf16 operands, PyTorch with bf16
#                                                    autocast in channels_last, its fastest CPU mode)
#
# Needs a release build (cargo build --release) and a Python with torch (PYTHON=..., default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
stem=seed runs=5 steps=20 threads=$(nproc) batch=64 torch_extra= ours_extra=
while [ $# -gt 0 ]; do
  case "$1" in
    --stem) stem=$2; shift 2 ;; --runs) runs=$2; shift 2 ;; --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;; --batch) batch=$2; shift 2 ;;
    --channels-last) torch_extra=--channels-last; shift ;;
    --precision)
      case "$2" in
        bf16) ours_extra="--precision bf16" torch_extra="--amp --channels-last" ;;
        fp32) ;;
        *) echo "--precision: fp32 or bf16" >&2; exit 2 ;;
      esac
      shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
bin=target/release/resnet-cifar
ref=../shared/bench/torch_reference.py
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$runs"); do
  "$bin" bench --json --stem "$stem" --batch-size "$batch" --steps "$steps" --threads "$threads" $ours_extra >>"$tmp/ours"
  OMP_NUM_THREADS=$threads "$py" -c '
import resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("peak_rss_bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
' "$ref" --stem "$stem" --batch "$batch" --steps "$steps" --threads "$threads" $torch_extra >>"$tmp/torch"
  echo "run $i/$runs done" >&2
done
"$py" - "$tmp/ours" "$tmp/torch" <<'PY'
import json, re, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1])]
text = open(sys.argv[2]).read()
t_train = [float(x) for x in re.findall(r"train_img_per_s=([\d.]+)", text)]
t_infer = [float(x) for x in re.findall(r"infer_img_per_s=([\d.]+)", text)]
t_rss = [int(x) for x in re.findall(r"peak_rss_bytes (\d+)", text)]
version = re.search(r"torch (\S+)", text).group(1)
med = statistics.median
o_train, o_infer = med(r["train_images_per_sec"] for r in ours), med(r["infer_images_per_sec"] for r in ours)
o_rss = max(r["peak_rss_bytes"] for r in ours)
print(f"stem={ours[0]['stem']} batch={ours[0]['batch_size']} threads={ours[0]['threads']} runs={len(ours)} torch={version} ours={ours[0]['backend']}")
print(f"{'':14}{'train img/s':>12}{'infer img/s':>13}{'peak MiB':>10}")
print(f"{'resnet-cifar':14}{o_train:12.1f}{o_infer:13.1f}{o_rss/2**20:10.0f}")
print(f"{'pytorch':14}{med(t_train):12.1f}{med(t_infer):13.1f}{max(t_rss)/2**20:10.0f}")
print(f"{'ratio':14}{o_train/med(t_train):12.2f}{o_infer/med(t_infer):13.2f}")
print("all runs: ours train", [round(r["train_images_per_sec"]) for r in ours], "torch train", [round(x) for x in t_train])
print("          ours infer", [round(r["infer_images_per_sec"]) for r in ours], "torch infer", [round(x) for x in t_infer])
PY
