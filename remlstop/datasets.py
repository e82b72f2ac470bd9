"""The paper's simulation setting, shared by the examples, benchmarks and tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["lenet", "paper_mlp", "paper_simple_function"]


def paper_simple_function(
    n: int = 600, n_train: int = 480, noise_sd: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's simple-function data: ``(x_train, y_train, x_test, y_test)``, float32.

    X ~ N(0, I_10); y = 0.2 [0.5 x1 + 0.8 tanh x2 + sin x3 + 0.6 x4 + 0.3 x5^2 + 0.05 e^{x6}
    + cos x7 + 0.5 |x8| + 0.4 x9 + 0.7 sin x10] + N(0, noise_sd^2). Shapes (n_train, 10),
    (n_train, 1), (n - n_train, 10), (n - n_train, 1). Uses its own generator, not the global RNG.
    """
    if not 0 < n_train < n:
        raise ValueError(f"need 0 < n_train < n, got n_train={n_train}, n={n}.")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    signal = 0.2 * (
        0.5 * x[:, 0]
        + 0.8 * torch.tanh(x[:, 1])
        + torch.sin(x[:, 2])
        + 0.6 * x[:, 3]
        + 0.3 * x[:, 4] ** 2
        + 0.05 * torch.exp(x[:, 5])
        + torch.cos(x[:, 6])
        + 0.5 * x[:, 7].abs()
        + 0.4 * x[:, 8]
        + 0.7 * torch.sin(x[:, 9])
    )
    y = signal + noise_sd * torch.randn(n, generator=g, dtype=torch.float64)
    x, y = x.float(), y.float().unsqueeze(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def paper_mlp(
    width: int = 500,
    depth: int = 2,
    d_in: int = 10,
    d_out: int = 1,
    activation: type[nn.Module] = nn.ReLU,
    seed: int = 0,
) -> nn.Sequential:
    """The paper's MLP: ``depth`` hidden layers of ``width`` units (P = 256,501 at the defaults)."""
    # The layers are built on the CPU: CUDA's generators are neither read (that would start
    # CUDA, which a forked DDP worker cannot do after) nor seeded.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        layers: list[nn.Module] = []
        fan_in = d_in
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), activation()]
            fan_in = width
        layers.append(nn.Linear(fan_in, d_out))
        return nn.Sequential(*layers)


def lenet(outputs: int = 1, seed: int = 0) -> nn.Sequential:
    """A LeNet-5-sized CNN for 1 x 28 x 28 inputs (P = 43,661 with one output): Conv2d(1, 6, 5),
    ReLU, MaxPool2d(2), Conv2d(6, 16, 5), ReLU, MaxPool2d(2), Flatten, then Linear 256 -> 120
    -> 84 -> ``outputs`` with ReLUs. Initialised from ``seed`` (the global RNG is left as is)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, outputs),
        )
