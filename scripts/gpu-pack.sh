#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs into one folder (default .gpu-pack), for a GPU machine
# that cannot build: the release binary and the GPU test binaries (stripped), the golden files,
# PyTorch's reference bench and, with DATA_FILES=N, the first N CIFAR-10 training files (the
# others are linked to them, so the run has 50,000 images of which N*10,000 are distinct).
set -euo pipefail
cd "$(dirname "$0")/.."
pack=${1:-.gpu-pack}
shared=$(cd ../shared && pwd)
rm -rf "$pack" && mkdir -p "$pack/bin" "$pack/shared/golden" "$pack/shared/bench" "$pack/shared/data/cifar10"
cargo build --release --quiet
strip -o "$pack/bin/resnet-cifar" target/release/resnet-cifar
for t in golden gradcheck cuda classic_models; do
    exe=$(cargo test --release --no-run --message-format=json --test "$t" 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("profile", {}).get("test") and m.get("executable"): print(m["executable"])')
    strip -o "$pack/bin/$t" "$exe"
done
cp "$shared"/golden/* "$pack/shared/golden/"
mkdir -p "$pack/fixtures" && cp tests/fixtures/classic_models.safetensors "$pack/fixtures/"
cp "$shared/bench/torch_reference.py" "$pack/shared/bench/"
echo "$shared" > "$pack/shared_path"
pwd > "$pack/manifest_dir"
n=${DATA_FILES:-0}
if [ "$n" -gt 0 ]; then
    data="$shared/data/cifar10"
    cp "$data/batches.meta.txt" "$pack/shared/data/cifar10/"
    for i in 1 2 3 4 5; do
        if [ "$i" -le "$n" ]; then
            cp "$data/data_batch_$i.bin" "$pack/shared/data/cifar10/"
        else
            ln -s "data_batch_$(( (i - 1) % n + 1 )).bin" "$pack/shared/data/cifar10/data_batch_$i.bin"
        fi
    done
fi
du -sh "$pack"
