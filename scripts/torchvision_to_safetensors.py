"""Converts a torchvision ResNet-18 checkpoint (.pth: a state_dict, or a whole model) into a
safetensors state_dict that `resnet-cifar train --init FILE` fine-tunes (and `eval`/`predict`
read as --stem torchvision).

    pip install torch safetensors
    python3 scripts/torchvision_to_safetensors.py resnet18-f37072fd.pth resnet18.safetensors

The ImageNet weights torchvision downloads (torchvision.models.resnet18(weights="DEFAULT"))
live in ~/.cache/torch/hub/checkpoints/. Those were trained on images normalised with
ImageNet's mean and std; give them to the run: --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225.
"""
import sys
import torch
from safetensors.torch import save_file


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    obj = torch.load(src, map_location="cpu", weights_only=False)
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    if not isinstance(state, dict) or "layer1.0.conv1.weight" not in state:
        sys.exit(f"{src}: not a torchvision ResNet state_dict (no 'layer1.0.conv1.weight')")
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, dst)
    fc = tensors.get("fc.bias")
    print(f"{dst}: {len(tensors)} tensors, {fc.numel() if fc is not None else '?'} classes")


if __name__ == "__main__":
    main()
