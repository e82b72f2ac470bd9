"""The layer-wise NTK (METHOD M1) of convolutional networks against explicit Jacobians."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from remlstop import _ntk_layerwise as layerwise
from remlstop.datasets import lenet
from remlstop.ntk import _dispatch, empirical_ntk, ntk_trace


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (N × P, M1 row order) by torch.func.jacrev on a float64 copy of the model, over its
    trainable parameters: independent of the library's backends. Integer inputs (indices into
    an embedding) are passed as they are."""
    model = copy.deepcopy(model).double().eval()
    x = x.double() if x.is_floating_point() else x
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def f(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, theta, (x,)).reshape(-1)

    jac = torch.func.jacrev(f)(params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def frozen(model: nn.Module, *names: str) -> nn.Module:
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return model


def head(channels: int, size: int, outputs: int = 1) -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(channels * size * size, outputs)]


# name: (network factory, input feature shape); every network is float64 here.
CASES = {
    "padding_int": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3), *head(3, 5)
        ),
        (2, 7, 7),
    ),
    "padding_same_even_kernel": (  # 'same' with a 4 × 2 kernel pads one more below and right
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (4, 2), padding="same"),
            nn.GELU(),
            nn.Conv2d(3, 3, 3, padding="same", dilation=2),
            *head(3, 6),
        ),
        (2, 6, 6),
    ),
    "padding_valid_and_tuple": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="valid"),
            nn.ReLU(),
            nn.Conv2d(3, 4, (3, 2), padding=(2, 1)),  # 5 × 5 -> 7 × 6
            nn.Flatten(),
            nn.Linear(4 * 7 * 6, 1),
        ),
        (2, 7, 7),
    ),
    "stride_2": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 2, stride=(2, 1))
        ),
        (2, 9, 8),  # output (n, 3, 2, 6): K = 36 from the conv output itself
    ),
    "dilation_2": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, padding=1), nn.Tanh(), *head(4, 6)),
        (2, 8, 8),
    ),
    "groups_2_no_bias": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, groups=2, bias=False),
            nn.ReLU(),
            nn.Conv2d(6, 4, 1, groups=2),
            *head(4, 4, 3),
        ),
        (4, 6, 6),
    ),
    "depthwise_separable": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3, groups=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 4, 1, bias=False),
            nn.AdaptiveAvgPool2d(2),
            *head(4, 2),
        ),
        (3, 6, 6),
    ),
    "pooling": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(4, 5, 1),
            nn.AdaptiveMaxPool2d((2, 1)),
            *head(5, 1, 3)[:1],
            nn.Linear(10, 3),
        ),
        (2, 10, 10),
    ),
    "frozen_conv_weight": (
        lambda: frozen(
            nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), *head(4, 2)),
            "0.weight",
            "2.bias",
        ),
        (2, 6, 6),
    ),
    "frozen_conv_layer": (
        lambda: frozen(
            nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), *head(4, 2, 3)),
            "2.weight",
            "2.bias",
        ),
        (2, 6, 6),
    ),
    "padding_modes": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(3, 3, 3, padding="same", padding_mode="replicate"),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, padding=(1, 2), padding_mode="circular"),
            *head(2, 5),
        ),
        (2, 5, 3),
    ),
    "unflatten_decoder": (
        lambda: nn.Sequential(
            nn.Linear(6, 32), nn.Tanh(), nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 3, 3, padding=1)
        ),
        (6,),
    ),
    "lenet_10_outputs": (lambda: lenet(outputs=10), (1, 28, 28)),
}


def make(case: str, n: int = 6, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = CASES[case]
    torch.manual_seed(seed)
    return factory().double(), torch.randn(n, *shape, dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_cross_kernel_and_trace_equal_explicit_jacobians(case: str) -> None:
    model, x = make(case)
    _, x2 = make(case, n=4, seed=1)
    J, J2 = jacobian(model, x), jacobian(model, x2)
    N = J.shape[0]
    H, info = empirical_ntk(model, x, return_info=True)
    assert info.path == "layerwise" and J.shape == (info.N, info.P)
    assert rel_err(H, J @ J.T / N) < 1e-12
    assert torch.equal(H, H.T)
    # Tiles of 4 rows: the symmetric kernel in several tiles, the cross kernel in 1 × 2.
    C, info = empirical_ntk(model, x, x2, chunk_size=4, return_info=True)
    assert info.path == "layerwise"
    assert rel_err(C, J2 @ J.T / N) < 1e-12
    trace = float((J * J).sum()) / N
    assert ntk_trace(model, x) == pytest.approx(trace, rel=1e-12)
    assert ntk_trace(model, x, chunk_size=4) == pytest.approx(trace, rel=1e-12)


def test_chunking_and_memory_budget_do_not_change_the_kernel() -> None:
    model, x = make("pooling", n=11)
    full = empirical_ntk(model, x)
    for chunk in (1, 3, 11, 50):
        assert rel_err(empirical_ntk(model, x, chunk_size=chunk), full) < 1e-13
    # A budget of a few rows' feature pass: passes smaller than the tiles.
    assert rel_err(empirical_ntk(model, x, memory_budget_bytes=200_000), full) < 1e-13


def test_float32_model_is_within_float32_accuracy_of_the_float64_kernel() -> None:
    model, x = make("lenet_10_outputs", n=5)
    reference = empirical_ntk(model, x)
    model32 = copy.deepcopy(model).float()
    H, info = empirical_ntk(model32, x.float(), return_info=True)
    assert info.path == "layerwise" and H.dtype == torch.float64
    assert rel_err(H, reference) < 1e-5
    _, x2 = make("lenet_10_outputs", n=3, seed=1)
    C = empirical_ntk(model32, x.float(), x2.float())
    assert rel_err(C, empirical_ntk(model, x, x2)) < 1e-5
    assert ntk_trace(model32, x.float()) == pytest.approx(float(reference.trace()), rel=1e-5)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_kernel_on_each_device_matches_the_cpu_float64_kernel(device: str) -> None:
    model, x = make("pooling", n=9)
    _, x2 = make("pooling", n=5, seed=1)
    reference, cross = empirical_ntk(model, x), empirical_ntk(model, x, x2)
    model = model.float().to(device)
    H, info = empirical_ntk(model, x.float().to(device), return_info=True)
    assert info.path == "layerwise" and H.device.type == device
    assert rel_err(H.cpu(), reference) < 1e-5
    C = empirical_ntk(model, x.float().to(device), x2.float().to(device), device="cpu")
    assert C.device.type == "cpu" and rel_err(C, cross) < 1e-5


def test_layerwise_equals_generic_path_on_lenet() -> None:
    model, x = make("lenet_10_outputs", n=4)
    fast = empirical_ntk(model, x, path="layerwise")
    assert rel_err(fast, empirical_ntk(model, x, path="generic")) < 1e-12


class Wrapper(nn.Module):
    """A LightningModule-like wrapper whose forward calls a CNN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_wrapper_of_a_cnn_is_delegated_to_the_layerwise_path() -> None:
    model, x = make("depthwise_separable")
    H, info = empirical_ntk(Wrapper(model), x, return_info=True)
    assert info.path == "layerwise"
    torch.testing.assert_close(H, empirical_ntk(model, x), rtol=0, atol=0)
    assert _dispatch(Wrapper(model), x, "auto", "trace").network is model


def batchnorm_cnn() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), *head(4, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.double().eval()


@pytest.mark.parametrize(
    ("factory", "shape", "reason"),
    [
        (
            batchnorm_cnn,
            (2, 6, 6),
            "BatchNorm2d.*parameters outside nn.Linear, nn.Conv2d and nn.Embedding",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), *head(3, 4)).double(),
            (2, 6, 6),
            "GroupNorm.*parameters outside",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softmax(1), *head(3, 4)).double(),
            (2, 6, 6),
            "Softmax.*not nn.Linear, nn.Conv2d, nn.Embedding or a row-wise",
        ),
    ],
    ids=["batchnorm2d", "groupnorm", "softmax"],
)
def test_unsupported_cnns_take_the_generic_path(factory, shape, reason: str) -> None:
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(5, *shape, dtype=torch.float64)
    H, info = empirical_ntk(model, x, return_info=True)
    assert info.path == "generic"
    J = jacobian(model, x)
    assert rel_err(H, J @ J.T / J.shape[0]) < 1e-12
    with pytest.raises(ValueError, match=reason):
        empirical_ntk(model, x, path="layerwise")


def test_shared_conv_is_refused() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), conv, *head(2, 5)).double()
    with pytest.raises(ValueError, match="more than once"):
        empirical_ntk(model, torch.randn(3, 2, 5, 5, dtype=torch.float64), path="layerwise")


def test_memory_estimate_counts_the_per_sample_gradients() -> None:
    model, x = make("lenet_10_outputs", n=50)
    conv = sum(p.numel() for m in model if isinstance(m, nn.Conv2d) for p in m.parameters())
    K, n2 = 10, 20
    work = layerwise.work_bytes(model, x, n2, K, 256, 8, 2**30)
    assert work >= (50 + n2) * K * conv * 8
    model32 = copy.deepcopy(model).float()
    assert layerwise.work_bytes(model32, x.float(), None, K, 256, 8, 2**30) < work


def test_auto_path_takes_the_generic_backend_when_only_it_fits(monkeypatch) -> None:
    model, x = make("padding_int")
    H = empirical_ntk(model, x)
    monkeypatch.setattr(layerwise, "work_bytes", lambda *args: 10**15)
    H2, info = empirical_ntk(model, x, return_info=True, memory_limit_bytes=2**31)
    assert info.path == "generic"
    assert rel_err(H2, H) < 1e-12
    with pytest.raises(MemoryError, match="GB"):
        empirical_ntk(model, x, path="layerwise", memory_limit_bytes=2**31)


def test_model_is_left_as_found() -> None:
    model, x = make("frozen_conv_layer")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(7)
    empirical_ntk(model, x)
    ntk_trace(model, x)
    drawn = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and all(p.grad is None for p in model.parameters())
