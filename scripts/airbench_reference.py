"""airbench94 on the CPU: the PyTorch side of resnet-cifar's `--model airbench` comparison.

The network, loader, whitening, lookahead, schedule, training loop and test-time augmentation
below are airbench94's (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv 2404.00498; github.com/KellerJordan/cifar10-airbench, legacy/airbench94.py, MIT licence),
kept as written there apart from what moves them to the CPU and onto this project's data:

- the images come from a CIFAR-10 binary folder (data_batch_1..5.bin); with --val-split N the
  last N training images are held out and evaluated on (resnet-cifar's split of CIFAR's files),
  else test_batch.bin is the test set;
- they are normalised with resnet-cifar's CIFAR-10 constants (mean 0.4914, 0.4822, 0.4465; std
  0.2023, 0.1994, 0.2010; airbench's std is 0.2470, 0.2435, 0.2616), so that both sides train on
  the same inputs; --airbench-norm takes airbench's;
- float32 weights on the CPU, with --amp under bf16 autocast (the fastest CPU mode), and
  channels_last with --channels-last (airbench's layout); no torch.compile warm-up run;
- airbench's clock (whitening + training + the final TTA evaluation) is time.perf_counter.

    python3 scripts/airbench_reference.py --data ../shared/data/cifar10 --val-split 5000 \
        --threads 2 --amp --channels-last --seed 0

prints one JSON line: seconds (airbench's clock), tta_accuracy, the settings, peak RSS in MiB.
"""
import argparse, contextlib, json, math, os, resource, time
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import classic_models as cm  # airbench's network, optimizer, schedule and lookahead
from whitening_fixture import init_whitening_conv  # airbench's whitening

hyp = {
    "opt": {
        "train_epochs": 9.9,
        "batch_size": 1024,
        "lr": 11.5,
        "momentum": 0.85,
        "weight_decay": 0.0153,
        "bias_scaler": 64.0,
        "label_smoothing": 0.2,
        "whiten_bias_epochs": 3,
    },
    "aug": {"flip": True, "translate": 2},
    "net": {"widths": (64, 256, 256), "batchnorm_momentum": 0.6, "scaling_factor": 1 / 9, "tta_level": 2},
}

OURS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
AIRBENCH = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def read_cifar(folder, files):
    raw = b"".join(open(os.path.join(folder, f), "rb").read() for f in files)
    rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
    return torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(rec[:, 0].astype(np.int64))


def batch_flip_lr(inputs):
    flip_mask = (torch.rand(len(inputs), device=inputs.device) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip_mask, inputs.flip(-1), inputs)


def batch_crop(images, crop_size):
    r = (images.size(-1) - crop_size) // 2
    shifts = torch.randint(-r, r + 1, size=(len(images), 2), device=images.device)
    images_out = torch.empty((len(images), 3, crop_size, crop_size), device=images.device, dtype=images.dtype)
    for sy in range(-r, r + 1):
        for sx in range(-r, r + 1):
            mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
            images_out[mask] = images[mask, :, r + sy : r + sy + crop_size, r + sx : r + sx + crop_size]
    return images_out


class CifarLoader:
    def __init__(self, images, labels, norm, batch_size, train, aug=None, channels_last=False):
        self.images = images.float() / 255
        if channels_last:
            self.images = self.images.to(memory_format=torch.channels_last)
        self.labels = labels
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
        self.normalize = lambda x: (x - mean) / std
        self.proc_images = {}
        self.epoch = 0
        self.aug = aug or {}
        self.batch_size = batch_size
        self.drop_last = train
        self.shuffle = train

    def __len__(self):
        return len(self.images) // self.batch_size if self.drop_last else math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        if self.epoch == 0:
            images = self.proc_images["norm"] = self.normalize(self.images)
            if self.aug.get("flip", False):
                images = self.proc_images["flip"] = batch_flip_lr(images)
            pad = self.aug.get("translate", 0)
            if pad > 0:
                self.proc_images["pad"] = F.pad(images, (pad,) * 4, "reflect")
        if self.aug.get("translate", 0) > 0:
            images = batch_crop(self.proc_images["pad"], self.images.shape[-2])
        elif self.aug.get("flip", False):
            images = self.proc_images["flip"]
        else:
            images = self.proc_images["norm"]
        if self.aug.get("flip", False):
            if self.epoch % 2 == 1:
                images = images.flip(-1)
        self.epoch += 1
        indices = (torch.randperm if self.shuffle else torch.arange)(len(images), device=images.device)
        for i in range(len(self)):
            idxs = indices[i * self.batch_size : (i + 1) * self.batch_size]
            yield (images[idxs], self.labels[idxs])


def infer(model, loader, tta_level, autocast):
    def infer_basic(inputs, net):
        return net(inputs).clone()

    def infer_mirror(inputs, net):
        return 0.5 * net(inputs) + 0.5 * net(inputs.flip(-1))

    def infer_mirror_translate(inputs, net):
        logits = infer_mirror(inputs, net)
        pad = 1
        padded_inputs = F.pad(inputs, (pad,) * 4, "reflect")
        inputs_translate_list = [padded_inputs[:, :, 0:32, 0:32], padded_inputs[:, :, 2:34, 2:34]]
        logits_translate_list = [infer_mirror(inputs_translate, net) for inputs_translate in inputs_translate_list]
        logits_translate = torch.stack(logits_translate_list).mean(0)
        return 0.5 * logits + 0.5 * logits_translate

    model.eval()
    test_images = loader.normalize(loader.images)
    infer_fn = [infer_basic, infer_mirror, infer_mirror_translate][tta_level]
    with torch.no_grad(), autocast():
        return torch.cat([infer_fn(inputs, model).float() for inputs in test_images.split(2000)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--val-split", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--amp", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=hyp["opt"]["train_epochs"])
    ap.add_argument("--airbench-norm", action="store_true", help="airbench's CIFAR-10 std, not resnet-cifar's")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    norm = AIRBENCH if a.airbench_norm else OURS
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.amp else contextlib.nullcontext

    train_x, train_y = read_cifar(a.data, [f"data_batch_{i}.bin" for i in range(1, 6)])
    if a.val_split:
        test_x, test_y = train_x[-a.val_split :], train_y[-a.val_split :]
        train_x, train_y = train_x[: -a.val_split], train_y[: -a.val_split]
    else:
        test_x, test_y = read_cifar(a.data, ["test_batch.bin"])
    batch_size, epochs = hyp["opt"]["batch_size"], a.epochs
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hyp["opt"]["label_smoothing"], reduction="none")
    test_loader = CifarLoader(test_x, test_y, norm, 2000, train=False, channels_last=a.channels_last)
    train_loader = CifarLoader(train_x, train_y, norm, batch_size, train=True, aug=hyp["aug"], channels_last=a.channels_last)
    total_train_steps = math.ceil(len(train_loader) * epochs)

    model = cm.airbench_net(hyp["net"]["widths"], hyp["net"]["batchnorm_momentum"], hyp["net"]["scaling_factor"])
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    current_steps = 0
    optimizer, scheduler, alpha_schedule = cm.airbench_optimizer(model, total_train_steps)
    lookahead_state = cm.LookaheadState(model)

    total_time_seconds = 0.0
    start = time.perf_counter()
    train_images = train_loader.normalize(train_loader.images[:5000])
    init_whitening_conv(model[0].weight.data, train_images, dtype=torch.float32)
    total_time_seconds += time.perf_counter() - start

    for epoch in range(math.ceil(epochs)):
        model[0].bias.requires_grad = epoch < hyp["opt"]["whiten_bias_epochs"]
        start = time.perf_counter()
        model.train()
        for inputs, labels in train_loader:
            with autocast():
                outputs = model(inputs)
                loss = loss_fn(outputs.float(), labels).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            current_steps += 1
            if current_steps % 5 == 0:
                lookahead_state.update(model, decay=alpha_schedule[current_steps].item())
            if current_steps >= total_train_steps:
                if lookahead_state is not None:
                    lookahead_state.update(model, decay=1.0)
                break
        epoch_seconds = time.perf_counter() - start
        total_time_seconds += epoch_seconds
        print(f"epoch {epoch + 1}: {epoch_seconds:.1f} s, loss {loss.item() / len(labels):.4f}", flush=True)

    start = time.perf_counter()
    logits = infer(model, test_loader, hyp["net"]["tta_level"], autocast)
    tta_val_acc = (logits.argmax(1) == test_loader.labels).float().mean().item()
    total_time_seconds += time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": round(total_time_seconds, 2),
                "tta_accuracy": tta_val_acc,
                "steps": current_steps,
                "amp": a.amp,
                "channels_last": a.channels_last,
                "threads": a.threads,
                "seed": a.seed,
                "val_split": a.val_split,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
