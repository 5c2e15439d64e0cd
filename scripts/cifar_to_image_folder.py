"""Writes CIFAR-10 binary files as an image folder (torchvision's ImageFolder layout), to train
resnet-cifar on it the way a user trains on their own images, and compare with the binary path.

    pip install numpy pillow
    python3 scripts/cifar_to_image_folder.py ../shared/data/cifar10 /tmp/cifar-png [--val 5000]

The training files' images go to OUT/train/CLASS/NNNNN.png in file order, except the last
--val images, which go to OUT/test/CLASS/NNNNN.png: the images `train --val-split 5000` holds
out on the binary files, so both runs are scored on the same images. CIFAR-10's class names are
already in sorted order, so the folder's label indices are the binary files' labels.
"""
import argparse, os
import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--val", type=int, default=5000)
    args = ap.parse_args()
    src = args.src
    if os.path.isdir(os.path.join(src, "cifar-10-batches-bin")):
        src = os.path.join(src, "cifar-10-batches-bin")
    records = np.concatenate(
        [np.fromfile(os.path.join(src, f"data_batch_{i}.bin"), dtype=np.uint8).reshape(-1, 3073) for i in range(1, 6)]
    )
    n = len(records)
    assert sorted(CLASSES) == CLASSES
    for split in ("train", "test"):
        for c in CLASSES:
            os.makedirs(os.path.join(args.out, split, c), exist_ok=True)
    for i, rec in enumerate(records):
        split = "test" if i >= n - args.val else "train"
        img = rec[1:].reshape(3, 32, 32).transpose(1, 2, 0)
        Image.fromarray(img).save(os.path.join(args.out, split, CLASSES[rec[0]], f"{i:05d}.png"))
    print(f"{n - args.val} training and {args.val} test images in {args.out}")


if __name__ == "__main__":
    main()
