"""The layer-wise NTK (METHOD M1) of networks that start with an nn.Embedding, against explicit
Jacobians."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from remlstop.ntk import _dispatch, empirical_ntk, ntk_trace
from tests.test_ntk_conv import jacobian, rel_err


def frozen_embedding(model: nn.Sequential) -> nn.Sequential:
    model[0].weight.requires_grad_(False)
    return model


# name: (network factory, shape of the integer inputs of 9 rows); every network is float64.
CASES = {
    "one_index_per_row": (
        lambda: nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 1)),
        (9,),
    ),
    "repeated_indices_and_padding": (
        lambda: nn.Sequential(
            nn.Embedding(6, 3, padding_idx=0),
            nn.Flatten(),
            nn.Linear(12, 5),
            nn.GELU(),
            nn.Linear(5, 2),
        ),
        (9, 4),
    ),
    "bag_of_indices_to_a_conv": (
        lambda: nn.Sequential(
            nn.Embedding(5, 2),
            nn.Unflatten(1, (1, 4)),
            nn.Flatten(2),
            nn.Unflatten(2, (4, 2)),
            nn.Conv2d(1, 2, 2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6, 1),
        ),
        (9, 4),
    ),
    "frozen_embedding": (
        lambda: frozen_embedding(nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 3))),
        (9,),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_cross_kernel_and_trace_equal_explicit_jacobians(case: str) -> None:
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = factory().double()
    vocabulary = model[0].num_embeddings
    x = torch.randint(0, vocabulary, shape)
    x2 = torch.randint(0, vocabulary, (4, *shape[1:]))
    if case == "repeated_indices_and_padding":
        x[0] = torch.tensor([2, 2, 0, 2])  # one index three times and the padding index
    assert _dispatch(model, x, "auto", "kernel").path == "layerwise"
    J, J2 = jacobian(model, x), jacobian(model, x2)
    N = J.shape[0]
    H = empirical_ntk(model, x, path="layerwise", chunk_size=4)
    assert rel_err(H, J @ J.T / N) < 1e-12
    C = empirical_ntk(model, x, x2, path="layerwise", chunk_size=3)
    assert rel_err(C, J2 @ J.T / N) < 1e-12
    assert ntk_trace(model, x) == pytest.approx(float((J * J).sum()) / N, rel=1e-12)


def test_float32_embedding_network_gives_float64_kernel_within_float32_accuracy() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 8), nn.Tanh(), nn.Linear(8, 1)
    )
    x = torch.randint(0, 10, (12, 3))
    H = empirical_ntk(model, x)
    assert H.dtype == torch.float64
    J = jacobian(model, x)
    assert rel_err(H, J @ J.T / J.shape[0]) < 1e-6


@pytest.mark.parametrize(
    ("embedding", "reason"),
    [
        (lambda: nn.Embedding(7, 4, max_norm=1.0), "max_norm"),
        (lambda: nn.Embedding(7, 4, scale_grad_by_freq=True), "index counts"),
    ],
)
def test_embeddings_whose_gradients_are_not_per_row_take_the_generic_path(
    embedding, reason: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(embedding(), nn.Linear(4, 1)).double()
    x = torch.randint(0, 7, (6,))
    backend = _dispatch(model, x, "auto", "kernel")
    assert backend.path == "generic" and reason in backend.reason
    with pytest.raises(ValueError, match=reason):
        empirical_ntk(model, x, path="layerwise")


def test_embedding_network_is_left_as_found() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4, padding_idx=1), nn.Tanh(), nn.Linear(4, 2)).double()
    before = copy.deepcopy(model.state_dict())
    empirical_ntk(model, torch.randint(0, 7, (8,)))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_embedding_kernel_on_each_device_matches_the_cpu_kernel(device: str) -> None:
    factory, shape = CASES["repeated_indices_and_padding"]
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randint(0, model[0].num_embeddings, shape)
    reference = empirical_ntk(model, x)
    H, info = empirical_ntk(model.to(device), x.to(device), return_info=True)
    assert info.path == "layerwise" and H.device.type == device
    assert rel_err(H.cpu(), reference) < 1e-12
