"""Prints PyTorch's optimizer trajectories that tests/optim.rs checks against.

    pip install torch && python3 scripts/optim_reference.py

A 4-element parameter p0 = [0.5, -1.0, 2.0, 0.0] takes 3 steps with gradients
g_t = [sin(t + i) for i in 0..4] (t = 1, 2, 3), lr 0.1.
"""
import math, torch

def run(make):
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    opt = make([p])
    for t in (1, 2, 3):
        p.grad = torch.tensor([math.sin(t + i) for i in range(4)])
        opt.step()
    return [float(v) for v in p.detach()]

cases = {
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05),
    "sgd_plain": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_dampening_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
}
for name, make in cases.items():
    print(name, ", ".join(f"{v:.9e}" for v in run(make)))
