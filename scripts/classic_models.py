"""The seed's comparison models in PyTorch, as resnet-cifar defines them (same state_dict keys),
and the fixture tests/classic_models.rs checks our engine against.

    python3 scripts/classic_models.py --fixture tests/fixtures/classic_models.safetensors

Weights are the golden README's formulas (entry k of the state_dict, element i), so the fixture
holds only the input, the labels, and PyTorch's outputs and gradient sums.
"""
import argparse, math
import torch
from torch import nn
import torch.nn.functional as F


class LeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        layers = []
        for cin, cout in [(3, 32), (32, 32), (32, 64)]:
            layers += [nn.Conv2d(cin, cout, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class VGG16(nn.Module):
    PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

    def __init__(self, classes=10):
        super().__init__()
        layers, cin = [], 3
        for v in self.PLAN:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def formula_weights(model):
    sd = model.state_dict()
    new = {}
    for k, (name, t) in enumerate(sd.items()):
        n = t.numel()
        i = torch.arange(n, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and t.dim() >= 2:
            fan_in = n / t.shape[0]
            v = math.sqrt(2.0 / fan_in) * math.sqrt(2.0) * torch.sin(0.7 * i + 0.3 * k + 0.1)
        elif leaf == "weight":
            v = 1.0 + 0.1 * torch.sin(0.9 * i + k)
        elif leaf == "bias":
            v = 0.1 * torch.cos(1.1 * i + k)
        elif leaf == "running_mean":
            v = torch.zeros(n, dtype=torch.float64)
        elif leaf == "running_var":
            v = torch.ones(n, dtype=torch.float64)
        else:
            new[name] = t
            continue
        new[name] = v.reshape(t.shape).to(t.dtype)
    model.load_state_dict(new)


def fixture(path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([3, 0, 9, 5])
    out = {"input": x, "labels": labels.to(torch.int32)}
    for name, model in [("lenet", LeNet()), ("vgg16", VGG16())]:
        formula_weights(model)
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        out[f"{name}.logits"] = logits.detach()
        out[f"{name}.loss"] = loss.detach().reshape(1)
        for pname, p in model.named_parameters():
            out[f"{name}.grad_sum.{pname}"] = p.grad.sum().reshape(1)
            out[f"{name}.grad_abs_sum.{pname}"] = p.grad.abs().sum().reshape(1)
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture")
    a = ap.parse_args()
    if a.fixture:
        fixture(a.fixture)


if __name__ == "__main__":
    main()
