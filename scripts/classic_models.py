"""The seed's comparison models in PyTorch, as resnet-cifar defines them (same state_dict keys),
airbench94's network as its own code defines it, and the fixture tests/classic_models.rs checks
our engine against.

    python3 scripts/classic_models.py --fixture tests/fixtures/classic_models.safetensors

Weights are the golden README's formulas (entry k of the state_dict, element i), so the fixture
holds only the input, the labels, and PyTorch's outputs and gradient sums.
"""
import argparse, json, math
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


# airbench94's network, from Keller Jordan's cifar10-airbench, legacy/airbench94.py (MIT licence),
# kept as written there apart from what moves it to the CPU in float32 (its make_net ends with
# .half().cuda() and channels_last).
class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class Mul(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features, momentum, eps=1e-12, weight=False, bias=True):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = weight
        self.bias.requires_grad = bias


class Conv(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size=3, padding="same", bias=False):
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, channels_in, channels_out, batchnorm_momentum):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out, batchnorm_momentum)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out, batchnorm_momentum)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.conv1(x)
        x = self.pool(x)
        x = self.norm1(x)
        x = self.activ(x)
        x = self.conv2(x)
        x = self.norm2(x)
        x = self.activ(x)
        return x


def airbench_net(widths=(64, 256, 256), batchnorm_momentum=0.6, scaling_factor=1 / 9, classes=10):
    whiten_kernel_size = 2
    whiten_width = 2 * 3 * whiten_kernel_size**2
    net = nn.Sequential(
        Conv(3, whiten_width, whiten_kernel_size, padding=0, bias=True),
        nn.GELU(),
        ConvGroup(whiten_width, widths[0], batchnorm_momentum),
        ConvGroup(widths[0], widths[1], batchnorm_momentum),
        ConvGroup(widths[1], widths[2], batchnorm_momentum),
        nn.MaxPool2d(3),
        Flatten(),
        nn.Linear(widths[2], classes, bias=False),
        Mul(scaling_factor),
    )
    net[0].weight.requires_grad = False
    return net


class LookaheadState:
    """airbench94's lookahead, as written there."""

    def __init__(self, net):
        self.net_ema = {k: v.clone() for k, v in net.state_dict().items()}

    def update(self, net, decay):
        for ema_param, net_param in zip(self.net_ema.values(), net.state_dict().values()):
            if net_param.dtype in (torch.half, torch.float):
                ema_param.lerp_(net_param, 1 - decay)
                net_param.copy_(ema_param)


def airbench_optimizer(model, total_train_steps, batch_size=1024, hyp_lr=11.5, momentum=0.85,
                       weight_decay=0.0153, bias_scaler=64.0):
    """airbench94's optimizer (SGD, Nesterov, two parameter groups), its triangle schedule as a
    per-step LambdaLR, and its lookahead decays, as its train() makes them."""
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = hyp_lr / kilostep_scale
    wd = weight_decay * batch_size / kilostep_scale
    lr_biases = lr * bias_scaler
    norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    other_params = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    param_configs = [
        dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
        dict(params=other_params, lr=lr, weight_decay=wd / lr),
    ]
    optimizer = torch.optim.SGD(param_configs, momentum=momentum, nesterov=True)

    def get_lr(step):
        warmup_steps = int(total_train_steps * 0.23)
        warmdown_steps = total_train_steps - warmup_steps
        if step < warmup_steps:
            frac = step / warmup_steps
            return 0.2 * (1 - frac) + 1.0 * frac
        frac = (step - warmup_steps) / warmdown_steps
        return 1.0 * (1 - frac) + 0.07 * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, get_lr)
    alpha_schedule = 0.95**5 * (torch.arange(total_train_steps + 1) / total_train_steps) ** 3
    return optimizer, scheduler, alpha_schedule


def airbench_steps(x, labels, total=7):
    """airbench94's train() loop on one fixed batch for `total` steps: its optimizer's two
    parameter groups, its triangle schedule, its summed label-smoothed loss and its lookahead
    (every 5 steps, and after the last). Returns the state_dict after the last step."""
    model = airbench_net()
    formula_weights(model)
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    optimizer, scheduler, alpha_schedule = airbench_optimizer(model, total)
    lookahead_state = LookaheadState(model)
    for current_steps in range(1, total + 1):
        outputs = model(x)
        loss = loss_fn(outputs, labels).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if current_steps % 5 == 0:
            lookahead_state.update(model, decay=alpha_schedule[current_steps].item())
        if current_steps >= total:
            lookahead_state.update(model, decay=1.0)
    return model.state_dict()


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
    meta = {}
    for name, model in [("lenet", LeNet()), ("vgg16", VGG16()), ("airbench", airbench_net())]:
        formula_weights(model)
        model.train()
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        meta[f"{name}.state_dict"] = json.dumps({k: list(v.shape) for k, v in model.state_dict().items()})
        out[f"{name}.logits"] = logits.detach()
        out[f"{name}.loss"] = loss.detach().reshape(1)
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            out[f"{name}.grad_sum.{pname}"] = p.grad.sum().reshape(1)
            out[f"{name}.grad_abs_sum.{pname}"] = p.grad.abs().sum().reshape(1)
    x16, labels16 = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    out["airbench_steps.input"], out["airbench_steps.labels"] = x16, labels16.to(torch.int32)
    for k, v in airbench_steps(x16, labels16).items():
        if v.dtype == torch.float32:
            out[f"airbench_steps.{k}"] = v
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print("wrote", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture")
    a = ap.parse_args()
    if a.fixture:
        fixture(a.fixture)


if __name__ == "__main__":
    main()
