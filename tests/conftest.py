import numpy as np
import pytest
import torch


def mlp_kernel(n: int = 120, d: int = 10, width: int = 64, seed: int = 0) -> np.ndarray:
    """A real NTK (float64, explicit Jacobian) of a small ReLU MLP on Gaussian inputs.

    Built here with torch.func directly so that the statistics tests do not depend on the
    library's own NTK engine.
    """
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(d, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 1),
    ).double()
    x = torch.randn(n, d, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p):
        return torch.func.functional_call(net, p, (x,)).reshape(-1)

    jac = torch.func.jacrev(f)(params)
    J = torch.cat([j.reshape(n, -1) for j in jac.values()], dim=1)
    return (J @ J.T / n).numpy()


@pytest.fixture(scope="session")
def mlp_H() -> np.ndarray:
    return mlp_kernel()


def random_psd(n: int, rank: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    A = rng.standard_normal((n, rank)) * np.exp(rng.standard_normal(rank))
    return scale * (A @ A.T) / n
