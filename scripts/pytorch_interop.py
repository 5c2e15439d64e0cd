"""Checks that checkpoints move between resnet-cifar and the seed's PyTorch model, both ways.

    pip install torch safetensors numpy
    python3 scripts/pytorch_interop.py --data ../shared/data/cifar10 --val-split 5000 \
        --ours RUN/last.safetensors --export /tmp/torch_model.safetensors

1. Loads our checkpoint into the seed's ResNet18 with load_state_dict(strict=True) and prints
   PyTorch's accuracy and loss on the validation split (compare: resnet-cifar eval --split val).
3. With --print-model, prints the seed model (the fixture tests/summary.rs compares against).
2. Saves a freshly initialised seed model as safetensors (--export) and prints PyTorch's
   figures for it (compare: resnet-cifar eval --checkpoint EXPORT --split val).
"""
import argparse, json, os
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


# The seed's network, as its tutorial writes it (names are the state_dict keys).
class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride=[1, 1], padding=1):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride[0], padding=padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride[1], padding=padding, bias=False),
            nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Sequential()
        if stride[0] != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride[0], bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = self.layer(x)
        out += self.shortcut(x)
        return F.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
                                   nn.BatchNorm2d(64), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = self._make_layer(64, [[1, 1], [1, 1]])
        self.conv3 = self._make_layer(128, [[2, 1], [1, 1]])
        self.conv4 = self._make_layer(256, [[2, 1], [1, 1]])
        self.conv5 = self._make_layer(512, [[2, 1], [1, 1]])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, out_channels, strides):
        layers = []
        for stride in strides:
            layers.append(BasicBlock(self.in_channels, out_channels, stride))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        return self.fc(self.avgpool(out).reshape(x.shape[0], -1))


def val_split(data, n):
    raw = b"".join(open(os.path.join(data, f"data_batch_{i}.bin"), "rb").read() for i in range(1, 6))
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)[-n:]
    x = torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(rec[:, 0].astype(np.int64))


def evaluate(model, x, y):
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), 64):
            out = model(x[i:i + 64])
            loss_sum += F.cross_entropy(out, y[i:i + 64]).item()
            correct += (out.argmax(1) == y[i:i + 64]).sum().item()
    return {"accuracy": correct / len(y), "loss_sum_of_batch_means": loss_sum}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--val-split", type=int, default=5000)
    ap.add_argument("--ours", help="a resnet-cifar checkpoint (safetensors)")
    ap.add_argument("--export", help="where to save a fresh PyTorch seed model as safetensors")
    ap.add_argument("--print-model", action="store_true",
                    help="print the seed model as PyTorch does (tests/fixtures/seed_model_print.txt)")
    a = ap.parse_args()
    if a.print_model:
        print(ResNet18())
        return
    torch.set_num_threads(2)
    if not a.data:
        ap.error("--data is required")
    x, y = val_split(a.data, a.val_split)
    if a.ours:
        model = ResNet18()
        model.load_state_dict(load_file(a.ours), strict=True)
        print(json.dumps({"pytorch_on": a.ours, **evaluate(model, x, y)}))
    if a.export:
        torch.manual_seed(0)
        model = ResNet18()
        # A few training-mode passes so the running statistics are not the initial ones.
        model.train()
        with torch.no_grad():
            for i in range(0, 512, 64):
                model(x[i:i + 64])
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.export)
        print(json.dumps({"pytorch_on": a.export, **evaluate(model, x, y)}))


if __name__ == "__main__":
    main()
