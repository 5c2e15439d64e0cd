#!/usr/bin/env bash
# GPU checks, run on a machine with an NVIDIA GPU from a folder prepared by
# scripts/gpu-pack.sh (binaries built elsewhere, the golden files, PyTorch's reference bench):
#   scripts/gpu-check.sh PACK_DIR [OUT_DIR] [tests|bench|train|cifar]
# Each part fits one 10-minute command (the device tool's limit), so call them one at a time:
#   tests  the CUDA golden tests, gradient checks, CPU/GPU comparisons, NCCL with one rank and
#          the classic models, one test thread and CUDA_LAUNCH_BLOCKING=1 (a fault names its
#          kernel)
#   bench  our bench beside PyTorch's (fp32, TF32/AMP, channels-last)
#   train  a short run of the seed's recipe (TRAIN_EPOCHS, default the recipe's)
#   cifar  the 94% attempt: the cifar recipe for CIFAR_EPOCHS (default 60) with Cutout 16, then
#          its flip-shift evaluation (pack with DATA_FILES=1: one 30 MB file carried, the other
#          four linked to it; checkpoints stay in /tmp, only metrics come back)
# Everything it prints also goes to OUT_DIR/gpu-check.log; the exit code is 1 when a step
# failed. The machine has no network: PyTorch is used only if it is already installed.
set -uo pipefail
pack=$(cd "${1:?usage: gpu-check.sh PACK_DIR [OUT_DIR] [what]}" && pwd)
out=${2:-.}
what=${3:-tests}
case "$what" in tests|bench|train|cifar) ;; *) echo "what: tests, bench, train or cifar" >&2; exit 2 ;; esac
mkdir -p "$out"
exec > >(tee -a "$out/gpu-check.log") 2>&1

step() { echo; echo "=== $* ($(date +%T))"; }
status=0
failed() { echo "FAILED: $*"; status=1; }
bin=$pack/bin

# The CUDA libraries of a PyTorch install, on the library path (our binary also finds them by
# asking Python; this makes sure every process, cuDNN's own sub-libraries included, does).
libdirs=$(python3 -c 'import glob, site
print(":".join(sorted(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib"))))' 2>/dev/null || true)
[ -n "$libdirs" ] && export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvidia-smi | grep -o "CUDA Version: [0-9.]*" || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || true
echo "NVRTC, cuDNN, NCCL found: $(for d in ${libdirs//:/ } /usr/local/cuda/lib64; do ls "$d" 2>/dev/null | grep -E '^lib(nvrtc|cudnn|nccl)\.so\.[0-9.]+$'; done | sort -u | tr '\n' ' ')"

# The test binaries read ../shared beside the checkout they were built in.
shared_at=$(cat "$pack/shared_path")
if [ ! -e "$shared_at" ]; then
    mkdir -p "$(dirname "$shared_at")" && ln -s "$pack/shared" "$shared_at"
fi
# ... and the repository's tests/fixtures.
manifest=$(cat "$pack/manifest_dir")
if [ ! -e "$manifest/tests/fixtures" ]; then
    mkdir -p "$manifest/tests" && ln -s "$pack/fixtures" "$manifest/tests/fixtures"
fi

if [ "$what" = tests ]; then
    # A test that cannot reach the GPU fails here instead of passing as skipped.
    export CUDA_LAUNCH_BLOCKING=1 RESNET_CIFAR_REQUIRE=gpu,nvrtc
    step "golden tests (CUDA and CPU)"
    timeout 150 "$bin/golden" --nocapture --test-threads 1 2>&1 | grep -v "^$" || failed golden
    step "gradient checks on CUDA"
    timeout 150 "$bin/gradcheck" cuda --test-threads 1 2>&1 | grep -v "^$" || failed gradcheck
    step "CUDA against the CPU backend, NCCL with one rank"
    timeout 150 "$bin/cuda" --nocapture --test-threads 1 2>&1 | grep -v "^$" || failed cuda
    step "LeNet and VGG-16 against PyTorch on CUDA"
    timeout 120 "$bin/classic_models" cuda --test-threads 1 2>&1 | grep -v "^$" || failed classic_models
fi

if [ "$what" = bench ]; then
    step "bench: ours"
    for p in fp32 tf32; do
        timeout 120 "$bin/resnet-cifar" bench --device cuda --precision "$p" --stem cifar --batch-size 512 --steps 30 --warmup 5 || failed "bench $p cifar"
        timeout 120 "$bin/resnet-cifar" bench --device cuda --precision "$p" --stem seed --batch-size 64 --steps 100 --warmup 10 || failed "bench $p seed"
    done
    step "bench: PyTorch"
    PYTHONUNBUFFERED=1 timeout 300 python3 - "$pack/shared/bench" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torch, torch_reference as t
runs = [
    ["--stem", "cifar", "--batch", "512"],
    ["--stem", "cifar", "--batch", "512", "--channels-last"],
    ["--stem", "cifar", "--batch", "512", "--amp"],
    ["--stem", "cifar", "--batch", "512", "--amp", "--channels-last"],
    ["--stem", "seed", "--batch", "64", "--steps", "100", "--warmup", "10"],
    ["--stem", "seed", "--batch", "64", "--steps", "100", "--warmup", "10", "--channels-last"],
]
print("torch.backends.cudnn.allow_tf32 =", torch.backends.cudnn.allow_tf32)
for r in runs:
    sys.argv = ["torch_reference", "--device", "cuda", "--steps", "30", "--warmup", "5"] + r
    print(" ".join(r), end=": ", flush=True)
    t.main()
EOF
    [ $? -eq 0 ] || failed "PyTorch bench (is torch installed?)"
fi

if [ "$what" = train ]; then
    step "train: the seed's recipe on the GPU"
    timeout 400 "$bin/resnet-cifar" train --device cuda --data "$pack/shared/data/cifar10" \
        --out /tmp/gpu-run --val-split 5000 ${TRAIN_EPOCHS:+--epochs $TRAIN_EPOCHS} || failed train
    cp /tmp/gpu-run/metrics.jsonl "$out/metrics.jsonl" 2>/dev/null || true
fi
if [ "$what" = cifar ]; then
    step "train: the cifar recipe, ${CIFAR_EPOCHS:-60} epochs, Cutout 16, on the GPU"
    # Checkpoints (45 MB each) stay here: a file over 16 MiB would not come back.
    timeout "${CIFAR_TIMEOUT:-500}" "$bin/resnet-cifar" train --device cuda --recipe cifar \
        --epochs "${CIFAR_EPOCHS:-60}" --cutout 16 --data "$pack/shared/data/cifar10" \
        --out /tmp/cifar-run --val-split 5000 || failed "cifar train"
    mkdir -p "$out/cifar-run" && cp /tmp/cifar-run/metrics.jsonl /tmp/cifar-run/config.json "$out/cifar-run/" 2>/dev/null
    step "eval: its last checkpoint with flip-shift TTA"
    timeout 60 "$bin/resnet-cifar" eval --device cuda --checkpoint /tmp/cifar-run/last.safetensors \
        --data "$pack/shared/data/cifar10" --split val --tta flip-shift || failed "cifar eval"
fi
step "done (status $status)"
exit $status
