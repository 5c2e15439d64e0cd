#!/usr/bin/env python3
"""Compares two safetensors files tensor for tensor, bit for bit (no numpy needed).

    scripts/same_tensors.py A.safetensors B.safetensors

Exit 0 when both hold the same tensor names, dtypes, shapes and bytes; else 1, naming the first
tensors that differ. The metadata (`__metadata__`) is not compared: it may name the run.
"""
import json
import struct
import sys


def tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    return {
        name: (t["dtype"], tuple(t["shape"]), body[t["data_offsets"][0] : t["data_offsets"][1]])
        for name, t in header.items()
    }


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
    differ = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            differ.append(f"{name}: only in {'the first' if name in a else 'the second'}")
        elif a[name] != b[name]:
            differ.append(f"{name}: {a[name][:2]} against {b[name][:2]}, bytes differ")
    if differ:
        print(f"{sys.argv[1]} and {sys.argv[2]}: {len(differ)} of {len(a)} tensors differ")
        for d in differ[:10]:
            print("  " + d)
        sys.exit(1)
    print(f"same {len(a)} tensors, bit for bit")


main()
