"""Reliability of the empirical NTK (METHOD M1): shared modules and parameters, memory checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from remlstop.ntk import empirical_ntk, ntk_trace, ntk_vector_product
from remlstop.stopper import REMLStopper


def jacrev_kernel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """H = J Jᵀ / N from torch.func.jacrev over the (deduplicated) parameter dict.

    On a copy: functional_call itself leaves a module applied twice holding plain tensors.
    """
    model = copy.deepcopy(model)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def f(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, theta, (x,)).reshape(-1)

    with torch.no_grad():
        jac = torch.func.jacrev(f)(params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1).double()
    return J @ J.T / J.shape[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def reused_module_net() -> nn.Sequential:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), lin, nn.Tanh(), lin, nn.Linear(8, 1))


def shared_parameter_net() -> nn.Sequential:
    torch.manual_seed(0)
    b, b2 = nn.Linear(8, 8), nn.Linear(8, 8)
    b2.weight = b.weight  # one Parameter in two modules (biases differ)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), b, nn.Tanh(), b2, nn.Linear(8, 1))


def attributes(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """Every (module, name, object) registered as a parameter or buffer."""
    return [
        (m, name, obj)
        for m in model.modules()
        for table in (m._parameters, m._buffers)
        for name, obj in table.items()
    ]


def assert_same_objects(model: nn.Module, before: list[tuple[nn.Module, str, object]]) -> None:
    for module, name, obj in before:
        now = getattr(module, name)
        assert now is obj, f"{type(module).__name__}.{name} was replaced by a {type(now).__name__}"
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


X = torch.randn(120, 5, generator=torch.Generator().manual_seed(1))
Y = torch.sin(2 * X[:, :1])

CALLS = {
    "auto": lambda m, x: empirical_ntk(m, x),
    "generic": lambda m, x: empirical_ntk(m, x, path="generic", chunk_size=7),
    "cross": lambda m, x: empirical_ntk(m, x, x[:9], path="generic"),
    "trace": lambda m, x: ntk_trace(m, x),
    "vector_product": lambda m, x: ntk_vector_product(m, x, torch.ones(x.shape[0])),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("factory", [reused_module_net, shared_parameter_net])
def test_shared_weights_keep_their_parameter_objects(factory, call) -> None:
    model = factory()
    before = attributes(model)
    CALLS[call](model, X)
    assert_same_objects(model, before)


def test_layerwise_path_keeps_parameter_objects() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    before = attributes(model)
    _, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "layerwise"
    assert_same_objects(model, before)


def test_reused_module_with_buffers_keeps_its_buffer_objects() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8).eval()
    model = nn.Sequential(nn.Linear(5, 8), bn, nn.Tanh(), nn.Linear(8, 8), bn, nn.Linear(8, 1))
    before = attributes(model)
    empirical_ntk(model, X)
    assert_same_objects(model, before)


def test_stopper_start_leaves_the_optimizer_holding_the_model_parameters() -> None:
    model = reused_module_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    REMLStopper(model, X, Y, optimizer=opt).start()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert type(model[2].weight) is nn.Parameter and model[2].weight is model[4].weight
    # ... so training still moves the model.
    before = model[2].weight.detach().clone()
    opt.zero_grad()
    ((model(X) - Y) ** 2).mean().backward()
    opt.step()
    assert not torch.equal(model[2].weight.detach(), before)


@pytest.mark.parametrize("factory", [reused_module_net, shared_parameter_net])
def test_shared_weights_kernel_matches_explicit_jacobian(factory) -> None:
    model = factory()
    reference = jacrev_kernel(model, X)
    for path in ("auto", "generic"):
        H = empirical_ntk(model, X, path=path)
        assert rel_err(H, reference) < 1e-6, path
    trace = ntk_trace(model, X)
    assert trace == pytest.approx(float(torch.diagonal(reference).sum()), rel=1e-6)


def test_shared_parameter_is_refused_by_the_layerwise_path() -> None:
    model = shared_parameter_net()
    _, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "generic"
    with pytest.raises(ValueError, match="more than once"):
        empirical_ntk(model, X, path="layerwise")


def test_wrapper_of_a_shared_parameter_net_is_not_delegated_to_the_layerwise_path() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = shared_parameter_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Wrapper()
    H, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "generic"
    assert rel_err(H, jacrev_kernel(model, X)) < 1e-6


# --- modules whose forward is not torch's -------------------------------------------------------
class NTKLinear(nn.Linear):
    """The NTK parameterisation: W x / sqrt(d_in) + b, a forward of its own."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight) / self.in_features**0.5 + self.bias


class Residual(nn.Sequential):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + super().forward(h)


class Doubled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def _mlp(first: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(first or nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))


def _subclassed() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(NTKLinear(5, 8), nn.Tanh(), NTKLinear(8, 1))


def _residual() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), Residual(nn.Tanh(), nn.Linear(8, 8)), nn.Linear(8, 1))


def _parametrized() -> nn.Module:
    model = _mlp()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Doubled())
    return model


def _weight_norm() -> nn.Module:
    model = _mlp(torch.nn.utils.parametrizations.weight_norm(nn.Linear(5, 8)))
    with torch.no_grad():  # g = ||v|| at initialisation hides the reparametrisation's effect
        model[0].parametrizations.weight.original0.mul_(2.0)
    return model


def _old_weight_norm() -> nn.Module:  # a forward pre-hook that rebuilds the weight
    return _mlp(torch.nn.utils.weight_norm(nn.Linear(5, 8)))


def _forward_hook() -> nn.Module:
    model = _mlp()
    model[0].register_forward_hook(lambda module, inputs, output: 3 * output)
    return model


def _forward_pre_hook() -> nn.Module:
    model = _mlp()
    model[2].register_forward_pre_hook(lambda module, inputs: (inputs[0] / 2,))
    return model


def _container_hook() -> nn.Module:
    model = _mlp()
    model.register_forward_hook(lambda module, inputs, output: 10 * output)
    return model


NOT_TORCH_FORWARD = {
    "subclass overriding forward": (_subclassed, "overrides the forward"),
    "Sequential subclass overriding forward": (_residual, "overrides the forward"),
    "parametrization": (_parametrized, "parametrized"),
    "parametrizations.weight_norm": (_weight_norm, "parametrized"),
    "nn.utils.weight_norm": (_old_weight_norm, "pre-hook"),
    "forward hook on a Linear": (_forward_hook, "forward hook"),
    "forward pre-hook on a Linear": (_forward_pre_hook, "pre-hook"),
    "forward hook on the Sequential": (_container_hook, "forward hook"),
}


@pytest.mark.parametrize("case", list(NOT_TORCH_FORWARD))
def test_a_forward_that_is_not_torchs_takes_the_generic_path(case) -> None:
    factory, reason = NOT_TORCH_FORWARD[case]
    model = factory()
    H, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "generic" and reason in info.reason
    torch.testing.assert_close(H, empirical_ntk(model, X, path="generic"), rtol=0, atol=0)
    assert ntk_trace(model, X) == pytest.approx(float(H.trace()), rel=1e-6)
    with pytest.raises(ValueError, match=reason):
        empirical_ntk(model, X, path="layerwise")


def test_the_kernel_of_a_network_with_its_own_forward_is_its_jacobians() -> None:
    for factory in (_subclassed, _residual, _parametrized, _forward_hook, _container_hook):
        model = factory()
        assert rel_err(empirical_ntk(model, X), jacrev_kernel(model, X)) < 1e-6, factory


def test_subclasses_that_keep_torchs_forward_and_hooks_on_row_wise_modules_stay_layerwise() -> None:
    class Plain(nn.Linear):
        pass

    seen: list[int] = []
    model = _mlp(Plain(5, 8))
    model[1].register_forward_hook(lambda module, inputs, output: seen.append(1))
    H, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "layerwise" and seen
    assert rel_err(H, empirical_ntk(model, X, path="generic")) < 1e-6


def test_backward_hooks_leave_the_kernel_of_the_forward_map() -> None:
    model = _mlp()
    reference = empirical_ntk(model, X)
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: (2 * grad_in[0],))
    model.register_full_backward_pre_hook(lambda module, grad_out: (3 * grad_out[0],))
    # On a row-wise module too: the layer-wise path calls its forward, past the hook.
    model[1].register_full_backward_hook(lambda module, grad_in, grad_out: (5 * grad_in[0],))
    H, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "layerwise"
    torch.testing.assert_close(H, reference, rtol=0, atol=0)
    assert ntk_trace(model, X) == pytest.approx(float(reference.trace()), rel=1e-6)


def test_a_full_backward_hook_that_no_backend_can_run_through_is_refused_clearly() -> None:
    model = _mlp()
    # A row-wise module whose forward hook must run and whose backward hook must not.
    model[1].register_forward_hook(lambda module, inputs, output: None)
    model[1].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    _, info = empirical_ntk(_mlp(), X, return_info=True)
    assert info.path == "layerwise"
    for path in ("auto", "generic"):
        with pytest.raises(ValueError, match=r"Tanh 1 has a full backward hook.*p\.register_hook"):
            empirical_ntk(model, X, path=path)
    with pytest.raises(ValueError, match="a forward hook, which must run, and a backward hook"):
        empirical_ntk(model, X, path="layerwise")


def test_a_rebuilt_forward_that_differs_from_the_model_is_caught(monkeypatch) -> None:
    from remlstop import _ntk_layerwise

    # With the class check disabled, the last guard (the layers re-run one by one) must see it.
    monkeypatch.setattr(_ntk_layerwise, "_overrides_forward", lambda module: False)
    model = _subclassed()
    _, info = empirical_ntk(model, X, return_info=True)
    assert info.path == "generic" and "does not reproduce the model's output" in info.reason


# --- memory -------------------------------------------------------------------------------------


def test_kernel_that_cannot_fit_raises_a_memory_error_naming_the_ways_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    for path in ("auto", "generic"):
        ways_out = r"GB.*available.*kernel='nystrom'.*max_samples=.*outputs"
        with pytest.raises(MemoryError, match=ways_out) as err:
            empirical_ntk(model, X, path=path, memory_limit_bytes=10_000)
        assert "0.000115 GB" in str(err.value)  # the 120 × 120 float64 kernel alone


def test_memory_error_for_a_kernel_larger_than_this_machine() -> None:
    # N = 60,000 (n = 20,000 rows, K = 3): 28.8 GB of float64 kernel, refused before allocating.
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.zeros(20_000, 5)
    with pytest.raises(MemoryError, match=r"28\.8 GB"):
        empirical_ntk(model, x, memory_limit_bytes=16 * 2**30)


def test_memory_limit_does_not_change_a_kernel_that_fits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    H = empirical_ntk(model, X)
    assert torch.equal(empirical_ntk(model, X, memory_limit_bytes=2**30), H)
    with pytest.raises(ValueError, match="memory_limit_bytes"):
        empirical_ntk(model, X, memory_limit_bytes=0)


def test_available_memory_reads_meminfo_and_a_cgroup_limit(tmp_path, monkeypatch) -> None:
    from remlstop import ntk

    limit, usage, stat = (tmp_path / name for name in ("max", "current", "stat"))
    limit.write_text("1000\n")
    usage.write_text("600\n")
    stat.write_text("anon 400\ninactive_file 100\n")
    files = ((str(limit), str(usage), str(stat), "inactive_file"),)
    monkeypatch.setattr(ntk, "_CGROUP_FILES", files)
    assert ntk._cgroup_headroom() == 500  # inactive page cache is reclaimable
    assert ntk._available_bytes(torch.device("cpu")) == 500
    limit.write_text("max\n")
    assert ntk._cgroup_headroom() is None
    meminfo = ntk._meminfo_available()
    if meminfo is not None:  # Linux
        assert meminfo > 0
        assert ntk._available_bytes(torch.device("cpu")) is not None


def test_kernel_dtypes_too_narrow_for_its_sums_are_refused():
    with pytest.raises(TypeError, match="cannot hold a kernel's sums"):
        empirical_ntk(nn.Linear(5, 1), X, dtype=torch.float16)


def test_a_float_memory_budget_is_taken_as_bytes_on_both_paths():
    model = _mlp()
    for path in ("layerwise", "generic"):
        H = empirical_ntk(model, X, path=path, memory_budget_bytes=1e6)
        torch.testing.assert_close(H, empirical_ntk(model, X, path=path))
    with pytest.raises(ValueError, match="positive number of bytes"):
        empirical_ntk(model, X, memory_budget_bytes="1e6")


def test_a_model_built_under_inference_mode_is_refused_with_the_way_out():
    with torch.inference_mode():
        model = nn.Linear(5, 1)
    with pytest.raises(ValueError, match="created under torch.inference_mode"):
        empirical_ntk(model, X)


def test_a_forward_that_mixes_the_rows_of_a_batch_is_refused():
    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x - x.mean(0))

    with pytest.raises(ValueError, match="depends on the other rows of the batch"):
        empirical_ntk(Centred(), X)


def test_numpy_integers_are_chunk_sizes_and_a_missing_cuda_is_named():
    model = _mlp()
    H = empirical_ntk(model, X, chunk_size=np.int64(7))
    torch.testing.assert_close(H, empirical_ntk(model, X))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        empirical_ntk(model, X, chunk_size=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this torch has no CUDA device"):
            empirical_ntk(model, X, device="cuda")
