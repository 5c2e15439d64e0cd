#!/usr/bin/env bash
# GPU checks, run on a machine with an NVIDIA GPU from a folder prepared by
# scripts/gpu-pack.sh (binaries built elsewhere, the golden files, PyTorch's reference bench):
#   scripts/gpu-check.sh PACK_DIR [OUT_DIR] [all|tests|bench|train|cifar]
# Runs the CUDA golden tests, gradient checks and CPU/GPU comparisons, then our bench beside
# PyTorch's (fp32, TF32/AMP, channels-last), then a short training run of the seed's recipe.
# `cifar` (not part of `all`) is the 94% attempt: the cifar recipe for CIFAR_EPOCHS (default 60)
# with Cutout 16, then its flip-shift evaluation; it needs all five data files (DATA_FILES=5).
# Everything it prints also goes to OUT_DIR/gpu-check.log.
set -uo pipefail
pack=$(cd "${1:?usage: gpu-check.sh PACK_DIR [OUT_DIR] [what]}" && pwd)
out=${2:-.}
what=${3:-all}
mkdir -p "$out"
exec > >(tee -a "$out/gpu-check.log") 2>&1

step() { echo; echo "=== $* ($(date +%T))"; }
bin=$pack/bin

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || true

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

if [ "$what" = all ] || [ "$what" = tests ]; then
    step "golden tests (CUDA and CPU)"
    timeout 300 "$bin/golden" --nocapture 2>&1 | grep -v "^$"
    step "gradient checks on CUDA"
    timeout 300 "$bin/gradcheck" cuda 2>&1 | grep -v "^$"
    step "CUDA against the CPU backend"
    timeout 300 "$bin/cuda" --nocapture --test-threads 1 2>&1 | grep -v "^$"
    step "LeNet and VGG-16 against PyTorch on CUDA"
    timeout 300 "$bin/classic_models" cuda 2>&1 | grep -v "^$"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    step "bench: ours"
    for p in fp32 tf32; do
        timeout 120 "$bin/resnet-cifar" bench --device cuda --precision "$p" --stem cifar --batch-size 512 --steps 30 --warmup 5
        timeout 120 "$bin/resnet-cifar" bench --device cuda --precision "$p" --stem seed --batch-size 64 --steps 100 --warmup 10
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
fi

if [ "$what" = all ] || [ "$what" = train ]; then
    step "train: the seed's recipe on the GPU"
    timeout 400 "$bin/resnet-cifar" train --device cuda --data "$pack/shared/data/cifar10" \
        --out /tmp/gpu-run --val-split 5000 ${TRAIN_EPOCHS:+--epochs $TRAIN_EPOCHS}
    cp /tmp/gpu-run/metrics.jsonl "$out/metrics.jsonl" 2>/dev/null || true
fi
if [ "$what" = cifar ]; then
    step "train: the cifar recipe, ${CIFAR_EPOCHS:-60} epochs, Cutout 16, on the GPU"
    timeout "${CIFAR_TIMEOUT:-540}" "$bin/resnet-cifar" train --device cuda --recipe cifar \
        --epochs "${CIFAR_EPOCHS:-60}" --cutout 16 --data "$pack/shared/data/cifar10" \
        --out "$out/cifar-run" --val-split 5000
    step "eval: its last checkpoint with flip-shift TTA"
    timeout 60 "$bin/resnet-cifar" eval --device cuda --checkpoint "$out/cifar-run/last.safetensors" \
        --data "$pack/shared/data/cifar10" --split val --tta flip-shift | head -3
    rm -rf "$out/cifar-run/checkpoints"
fi
step done
