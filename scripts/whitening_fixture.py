"""The whitening initialisation of airbench94's first layer, as its own code computes it, for
the fixture tests/whitening.rs checks ours against.

    python3 scripts/whitening_fixture.py ../shared/data/cifar10 tests/fixtures/whitening.json

get_patches, get_whitening_parameters and init_whitening_conv below are airbench94's
(Keller Jordan, github.com/KellerJordan/cifar10-airbench, legacy/airbench94.py, MIT licence),
run on the first N images of data_batch_1.bin normalised with its CIFAR-10 mean and standard
deviation, in float64 (airbench casts the patches to float32, `.float()`, and normalises in fp16
on the GPU; its f32 covariance of 480,500 patches moves the smallest eigen-directions by about
1e-3, so the fixture takes float64, `.double()`, to check ours, summed in f64, to 1e-6).
"""
import json, sys
import numpy as np
import torch

CIFAR_MEAN = torch.tensor((0.4914, 0.4822, 0.4465))
CIFAR_STD = torch.tensor((0.2470, 0.2435, 0.2616))
N = 500


def get_patches(x, patch_shape, dtype=torch.float64):
    c, (h, w) = x.shape[1], patch_shape
    return x.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).to(dtype)


def get_whitening_parameters(patches):
    n, c, h, w = patches.shape
    patches_flat = patches.view(n, -1)
    est_patch_covariance = (patches_flat.T @ patches_flat) / n
    eigenvalues, eigenvectors = torch.linalg.eigh(est_patch_covariance, UPLO="U")
    return eigenvalues.flip(0).view(-1, 1, 1, 1), eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)


def init_whitening_conv(weight, train_set, eps=5e-4, dtype=torch.float64):
    """airbench's, on the weight tensor; its patches in `dtype` (airbench's own: float32)."""
    patches = get_patches(train_set, patch_shape=weight.shape[2:], dtype=dtype)
    eigenvalues, eigenvectors = get_whitening_parameters(patches)
    eigenvectors_scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
    weight[:] = torch.cat((eigenvectors_scaled, -eigenvectors_scaled))
    return eigenvalues.flatten()


def main():
    data, out = sys.argv[1], sys.argv[2]
    raw = np.fromfile(f"{data}/data_batch_1.bin", dtype=np.uint8)[: N * 3073].reshape(N, 3073)
    images = torch.tensor(raw[:, 1:].reshape(N, 3, 32, 32)).double() / 255
    mean, std = CIFAR_MEAN.double().view(1, 3, 1, 1), CIFAR_STD.double().view(1, 3, 1, 1)
    images = (images - mean) / std
    weight = torch.empty(24, 3, 2, 2, dtype=torch.float64)
    eigenvalues = init_whitening_conv(weight, images)
    with open(out, "w") as f:
        json.dump({"images": N, "eps": 5e-4, "eigenvalues": eigenvalues.tolist(),
                   "weight": weight.flatten().tolist()}, f)
        f.write("\n")


if __name__ == "__main__":
    main()
