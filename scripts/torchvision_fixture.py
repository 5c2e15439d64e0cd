"""torchvision's ResNet-18 with formula-made weights: the fixture tests/datasets.rs checks our
engine against (our --stem torchvision network loading torchvision's state_dict names).

    python3 scripts/torchvision_fixture.py --out tests/fixtures/torchvision_resnet18.safetensors

Entry k of torchvision.models.resnet18(num_classes=10).state_dict(), element i (flat, PyTorch
layout), computed in float64 and rounded to float32:
  weight, 2-D or more: 0.8 sin(0.7 i + 0.3 k + 0.1) / sqrt(fan_in)  (activations stay O(1) in
                       eval mode, so the logits compare to 1e-4 absolute)
  weight, 1-D:         1 + 0.1 sin(0.9 i + k)
  bias:                0.1 cos(1.1 i + k)
  running_mean:        0.05 sin(1.3 i + k)
  running_var:         1 + 0.2 cos(0.7 i + k)^2
  num_batches_tracked: 0
The input at side S (2 images, NCHW): x[j] = sin(0.01 j + 0.5), j the flat index. The fixture
holds the inputs and the eval-mode logits at 32x32 and 64x64, not the weights.
"""
import argparse, math
import torch
import torchvision
from safetensors.torch import save_file


def formula_state(model):
    state = {}
    for k, (name, t) in enumerate(model.state_dict().items()):
        leaf = name.rsplit(".", 1)[1]
        n = t.numel()
        if leaf == "num_batches_tracked":
            state[name] = torch.zeros_like(t)
            continue
        vals = []
        for i in range(n):
            if leaf == "weight" and t.dim() >= 2:
                fan_in = n // t.shape[0]
                v = 0.8 * math.sin(0.7 * i + 0.3 * k + 0.1) / math.sqrt(fan_in)
            elif leaf == "weight":
                v = 1.0 + 0.1 * math.sin(0.9 * i + k)
            elif leaf == "bias":
                v = 0.1 * math.cos(1.1 * i + k)
            elif leaf == "running_mean":
                v = 0.05 * math.sin(1.3 * i + k)
            elif leaf == "running_var":
                v = 1.0 + 0.2 * math.cos(0.7 * i + k) ** 2
            else:
                raise ValueError(name)
            vals.append(v)
        state[name] = torch.tensor(vals, dtype=torch.float64).to(torch.float32).reshape(t.shape)
    return state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(formula_state(model))
    model.eval()
    out = {}
    for side in (32, 64):
        n = 2 * 3 * side * side
        x = torch.tensor([math.sin(0.01 * j + 0.5) for j in range(n)], dtype=torch.float64)
        x = x.to(torch.float32).reshape(2, 3, side, side)
        with torch.no_grad():
            out[f"logits_{side}"] = model(x).contiguous()
        out[f"input_{side}"] = x.contiguous()
    save_file(out, args.out, metadata={"torch": torch.__version__, "torchvision": torchvision.__version__})
    print({k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
