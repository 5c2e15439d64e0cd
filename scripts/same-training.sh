#!/usr/bin/env bash
# Proves a change leaves training bit-identical: trains 3 steps with two binaries under each
# configuration (fp32 and bf16 where the CPU has it, seed and cifar stems, 1 and 2 threads,
# and --winograd false) and compares the checkpoints tensor for tensor, then an evaluation of
# each checkpoint (printed loss and accuracy, fused inference paths included).
#
#   scripts/same-training.sh BEFORE_BINARY AFTER_BINARY [DATA]
set -euo pipefail
before=$1 after=$2 data=${3:-../shared/data/cifar10}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
precisions=(fp32)
if "$after" bench --steps 1 --warmup 0 --batch-size 2 --precision bf16 --json >/dev/null 2>&1; then
    precisions+=(bf16)
else
    echo "bf16: not on this CPU, fp32 only"
fi
failed=0
check() { # name, precision, threads, winograd, train flags...
    local name=$1 precision=$2 threads=$3 winograd=$4
    shift 4
    for side in before after; do
        local bin=$before
        [ "$side" = after ] && bin=$after
        "$bin" train --data "$data" --val-split 500 --max-steps 3 --log-every 1 --out "$work/$name-$side" \
            --precision "$precision" --threads "$threads" --winograd "$winograd" "$@" >/dev/null
        # Builds before the checkpoints recorded the Winograd choice evaluated with Winograd.
        local eval_winograd=()
        "$bin" eval --help | grep -q -- --winograd && eval_winograd=(--winograd "$winograd")
        "$bin" eval --checkpoint "$work/$name-$side/last.safetensors" --data "$data" --split val --val-split 500 \
            --precision "$precision" --threads "$threads" "${eval_winograd[@]}" --json | sed -e 's/"seconds":[0-9.e+-]*//' -e 's/"checkpoint":"[^"]*"//' >"$work/$name-$side.eval"
    done
    printf '%-28s ' "$name"
    local ok=1
    python3 "$here/same_tensors.py" "$work/$name-before/last.safetensors" "$work/$name-after/last.safetensors" || ok=0
    python3 "$here/same_tensors.py" "$work/$name-before/train_state.safetensors" \
        "$work/$name-after/train_state.safetensors" >/dev/null || { echo "  train_state differs"; ok=0; }
    cmp -s "$work/$name-before.eval" "$work/$name-after.eval" || {
        echo "  evaluations differ:"
        cat "$work/$name-before.eval" "$work/$name-after.eval"
        ok=0
    }
    [ $ok = 1 ] || failed=1
}
for p in "${precisions[@]}"; do
    for stem in seed cifar; do
        for t in 1 2; do
            check "$p-$stem-$t" "$p" "$t" true --stem "$stem"
        done
    done
done
check fp32-seed-2-nowinograd fp32 2 false --stem seed
check fp32-lenet-2 fp32 2 true --model lenet
[ $failed = 0 ] && echo "all equal" || { echo "DIFFERENCES"; exit 1; }
