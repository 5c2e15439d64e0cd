"""The seed's training code in PyTorch, for comparing whole runs with resnet-cifar's `seed` recipe.

    pip install torch torchvision safetensors numpy
    python3 scripts/seed_reference.py --data ../shared/data/cifar10 --val-split 5000 \
        --epochs 1 --seed 3 --metrics /tmp/torch-seed3.jsonl

What the tutorial's script does (../shared/seed), on the CIFAR-10 binary files: the seed's
ResNet-18 (scripts/pytorch_interop.py, the network of ../shared/bench/torch_reference.py under the
seed's state_dict names), Adam(lr 0.01, betas 0.9/0.999, eps 1e-8), LambdaLR 1/(epoch+1) stepped
once an epoch, DataLoader(batch_size=64) without shuffling, torchvision's RandomCrop(32, padding=4)
-> RandomHorizontalFlip -> ToTensor -> Normalize on PIL images; cross-entropy; the loss logged
every 100 steps (a global counter), the held-out images evaluated after every epoch.

Beyond the seed, for the comparison (docs/seed-vs-pytorch.md) and the test fixture
(tests/seed_dynamics.rs):
  --val-split N      hold out the last N training images (resnet-cifar's --val-split), evaluated
  --no-augment       ToTensor -> Normalize only (resnet-cifar: --crop-pad 0 --flip false)
  --init FILE        start from a safetensors state_dict (resnet-cifar: --init FILE)
  --formula-init     start from the golden files' formula-made weights (../shared/golden/README.md)
  --save-init FILE   write the starting state_dict as safetensors, for resnet-cifar's --init
  --limit N          train on the first N training images only
  --fixture FILE     after training, write the per-step losses and a summary of every state entry
  --save FILE        after training, write the state_dict as safetensors (resnet-cifar eval reads it)
  --float64          compute in float64 (to measure how far float32's rounding alone moves a run)
  --compare A B      print how far two fixtures' runs end apart, measured as tests/seed_dynamics.rs does
Every logged value goes to --metrics as JSON lines shaped like resnet-cifar's metrics.jsonl.
"""
import argparse, json, math, os, sys, time
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_interop import ResNet18  # noqa: E402  (the seed's network, under its names)
from classic_models import formula_weights  # noqa: E402  (the golden README's weights)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def read_cifar10(folder):
    """(images [N, 32, 32, 3] uint8, labels [N] int64) of data_batch_1..5.bin, in file order."""
    parts = []
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}.bin")
        parts.append(np.fromfile(path, dtype=np.uint8).reshape(-1, 3073))
    rec = np.concatenate(parts)
    return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), rec[:, 0].astype(np.int64)


class Images(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 dataset is: a PIL image per item, then the transform."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def save_state(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def evaluate(model, loader):
    """The seed's test step: sum of the per-batch mean losses, and accuracy."""
    model.eval()
    loss_sum, total, correct, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss_sum += F.cross_entropy(out, y).item()
            total += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    return {"loss_sum_of_batch_means": loss_sum, "loss": total / n, "accuracy": correct / n, "correct": correct,
            "images": n}


def summary(model):
    """Per state entry N: sum and sum of |x| (in f64) and 64 samples at flat indices j * n / 64."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        flat = t.detach().reshape(-1).double()
        n = flat.numel()
        idx = torch.arange(n) if n <= 64 else torch.tensor([j * n // 64 for j in range(64)])
        out[f"sum.{name}"] = flat.sum().float().reshape(1)
        out[f"abs_sum.{name}"] = flat.abs().sum().float().reshape(1)
        out[f"sample.{name}"] = flat[idx].float().contiguous()
    return out


def compare(path_a, path_b):
    """The gaps tests/seed_dynamics.rs bounds, between two fixtures (B the reference)."""
    a, b = load_file(path_a), load_file(path_b)
    numel = {k: v.numel() for k, v in ResNet18().state_dict().items()}
    loss = (a["loss"] - b["loss"]).abs()
    print(f"loss: largest gap {loss.max().item():.4g}; per step " + " ".join(f"{v:.2g}" for v in loss.tolist()))
    per = []
    for key in b:
        if not key.startswith("sample."):
            continue
        name = key[len("sample."):]
        scale = b[f"abs_sum.{name}"].item() / numel[name]
        per.append(((a[key] - b[key]).abs().max().item() / scale, name,
                    abs(a[f"abs_sum.{name}"].item() / b[f"abs_sum.{name}"].item() - 1)))
    per.sort()
    print(f"samples: worst {per[-1][0]:.4g} ({per[-1][1]}), median {per[len(per) // 2][0]:.4g} of the entry's mean |x|")
    worst = max(per, key=lambda p: p[2])
    print(f"sum of |x|: worst relative gap {worst[2]:.4g} ({worst[1]})")


def main():
    if sys.argv[1:2] == ["--compare"] and len(sys.argv) == 4:
        return compare(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 binary folder (data_batch_1..5.bin)")
    ap.add_argument("--val-split", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="torch.manual_seed: initial weights and augmentation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--init")
    ap.add_argument("--formula-init", action="store_true")
    ap.add_argument("--save-init")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--metrics")
    ap.add_argument("--fixture")
    ap.add_argument("--save", help="write the final state_dict here (safetensors)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="also write it every N steps, to the --save path with -stepN before the suffix")
    ap.add_argument("--float64", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x, y = read_cifar10(a.data)
    if a.val_split:
        (x, vx), (y, vy) = np.split(x, [len(x) - a.val_split]), np.split(y, [len(y) - a.val_split])
    if a.limit:
        x, y = x[:a.limit], y[:a.limit]
    test_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    train_tf = test_tf if a.no_augment else T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    train_loader = torch.utils.data.DataLoader(Images(x, y, train_tf), batch_size=64)
    val_loader = torch.utils.data.DataLoader(Images(vx, vy, test_tf), batch_size=64) if a.val_split else None

    model = ResNet18()
    if a.init:
        model.load_state_dict(load_file(a.init), strict=True)
    elif a.formula_init:
        formula_weights(model)
    if a.float64:
        torch.set_default_dtype(torch.float64)
        model = model.double()
    if a.save_init:
        save_state(model, a.save_init)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-08, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda epoch: 1 / (epoch + 1))
    metrics = open(a.metrics, "w") if a.metrics else None
    log = lambda d: metrics and (metrics.write(json.dumps(d) + "\n"), metrics.flush())
    losses, step, started = [], 0, time.perf_counter()
    for epoch in range(a.epochs):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        for imgs, targets in train_loader:
            loss = F.cross_entropy(model(imgs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step % a.log_every == 0:
                print(f"step {step}, loss {loss.item()}", flush=True)
                log({"kind": "train", "step": step, "epoch": epoch, "loss": loss.item(), "lr": lr})
            if a.save_every and step % a.save_every == 0:
                save_state(model, a.save.replace(".safetensors", f"-step{step}.safetensors"))
            if step == a.max_steps:
                break
        seconds = time.perf_counter() - t0
        if val_loader is not None:
            r = evaluate(model, val_loader)
            print(f"epoch {epoch + 1}/{a.epochs}: val loss {r['loss_sum_of_batch_means']:.4f}, "
                  f"accuracy {r['accuracy']:.4f}; trained in {seconds:.0f} s", flush=True)
            log({"kind": "eval", "split": "val", "epoch": epoch, "step": step, **r, "lr": lr,
                 "train_seconds": seconds})
        scheduler.step()
        if step == a.max_steps:
            break
    if a.save:
        save_state(model, a.save)
    if a.fixture:
        tensors = summary(model)
        tensors["loss"] = torch.tensor(losses, dtype=torch.float32)
        meta = {"made_by": f"scripts/seed_reference.py (torch {torch.__version__})",
                "args": " ".join(sys.argv[1:])}
        save_file(tensors, a.fixture, metadata=meta)
    print(f"{step} steps in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
