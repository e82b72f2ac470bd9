"""Tests of the empirical NTK (METHOD M1) against explicit float64 Jacobian products."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from remlstop.ntk import NTKInfo, empirical_ntk, ntk_trace, ntk_vector_product


class BufferNet(nn.Module):
    """A network whose forward reads a registered buffer (an input standardisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 10))
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x * self.scale)))


def paper_mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    )


def tanh_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 12), nn.Tanh(), nn.Sequential(nn.Linear(12, 12), nn.GELU()), nn.Linear(12, 3)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def bn_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


MODELS = {
    "paper_mlp": (paper_mlp, (10,), torch.float32),
    "tanh_mlp_3_outputs": (tanh_mlp, (10,), torch.float64),
    "cnn": (small_cnn, (1, 6, 6), torch.float64),
    "batchnorm_eval": (bn_net, (10,), torch.float64),
    "buffer": (BufferNet, (10,), torch.float64),
}


def make(name: str, n: int = 7, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape, dtype = MODELS[name]
    torch.manual_seed(seed)
    return factory().to(dtype), torch.randn(n, *shape, dtype=dtype)


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (N × P) in float64 on a float64 copy of the model, one backward per output entry."""
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x.double()).reshape(-1)
    rows = []
    for i in range(out.numel()):
        grads = torch.autograd.grad(out[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tolerance(x: torch.Tensor) -> float:
    return 1e-5 if x.dtype == torch.float32 else 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_kernel_equals_explicit_jacobian_product(name: str) -> None:
    model, x = make(name)
    J = explicit_jacobian(model, x)
    H, info = empirical_ntk(model, x, return_info=True)
    assert H.dtype == torch.float64 and not H.requires_grad
    assert H.shape == (J.shape[0], J.shape[0]) == (info.N, info.N)
    assert J.shape[1] == info.P and info.n * info.K == info.N
    assert rel_err(H, J @ J.T / J.shape[0]) < tolerance(x)
    assert torch.equal(H, H.T)


@pytest.mark.parametrize("name", ["paper_mlp", "tanh_mlp_3_outputs", "cnn"])
def test_cross_kernel(name: str) -> None:
    model, x = make(name)
    _, x2 = make(name, n=4, seed=1)
    J, J2 = explicit_jacobian(model, x), explicit_jacobian(model, x2)
    C = empirical_ntk(model, x, x2, chunk_size=3)
    assert C.shape == (J2.shape[0], J.shape[0])
    assert rel_err(C, J2 @ J.T / J.shape[0]) < tolerance(x)


def frozen(model: nn.Module, *names: str) -> nn.Module:
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return model


LAYERWISE_CASES = {
    "paper_mlp": lambda: paper_mlp().double(),
    "tanh_mlp_3_outputs": lambda: tanh_mlp().double(),
    "float32_mlp": paper_mlp,
    "frozen_first_weight": lambda: frozen(paper_mlp().double(), "0.weight"),
    "frozen_last_bias": lambda: frozen(tanh_mlp().double(), "3.bias"),
    "frozen_middle_layer": lambda: frozen(paper_mlp().double(), "2.weight", "2.bias"),
    "no_bias_with_flatten": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(10, 9, bias=False), nn.SiLU(), nn.Linear(9, 2)
    ).double(),
    "frozen_last_weight": lambda: frozen(tanh_mlp().double(), "3.weight"),
    "activation_after_last_linear": lambda: nn.Sequential(
        nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh()
    ).double(),
    "unflattened_outputs": lambda: nn.Sequential(
        nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 6), nn.Unflatten(1, (2, 3))
    ).double(),
    "one_linear_layer": lambda: nn.Linear(10, 3).double(),
}


@pytest.mark.parametrize("case", list(LAYERWISE_CASES))
def test_layerwise_path_equals_generic_path(case: str) -> None:
    torch.manual_seed(3)
    model = LAYERWISE_CASES[case]()
    dtype = next(model.parameters()).dtype
    x = torch.randn(9, 10, dtype=dtype)
    fast, info = empirical_ntk(model, x, return_info=True)
    generic = empirical_ntk(model, x, path="generic")
    assert info.path == "layerwise"
    assert rel_err(fast, generic) < 1e-6
    x2 = torch.randn(4, 10, dtype=dtype)
    assert (
        rel_err(
            empirical_ntk(model, x, x2, path="layerwise"),
            empirical_ntk(model, x, x2, path="generic"),
        )
        < 1e-6
    )


def test_layerwise_matches_explicit_with_frozen_layers() -> None:
    model = frozen(paper_mlp().double(), "0.weight", "4.bias")
    x = torch.randn(6, 10, dtype=torch.float64)
    J = explicit_jacobian(model, x)
    H = empirical_ntk(model, x, path="layerwise")
    assert rel_err(H, J @ J.T / J.shape[0]) < 1e-12


@pytest.mark.parametrize("path", ["layerwise", "generic"])
def test_chunked_equals_unchunked(path: str) -> None:
    model, x = make("tanh_mlp_3_outputs", n=11)
    full = empirical_ntk(model, x, path=path)
    for chunk in (1, 3, 11, 50):
        assert rel_err(empirical_ntk(model, x, path=path, chunk_size=chunk), full) < 1e-12


def test_generic_memory_budget_splits_rows_and_parameters() -> None:
    model, x = make("tanh_mlp_3_outputs", n=11)
    full = empirical_ntk(model, x, path="generic")
    # 4 KiB holds less than one row's Jacobian (3 × 339 float64 values): parameter groups too.
    small, info = empirical_ntk(
        model, x, path="generic", memory_budget_bytes=4096, return_info=True
    )
    assert info.chunk_size >= 1
    assert rel_err(small, full) < 1e-12


def model_dtype_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (N × P) in the model's own dtype, one backward per output entry, cast to float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
        for i in range(out.numel())
    ]
    return torch.stack(rows).double()


def test_generic_float32_products_accumulate_groups_in_float64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A float32 model's generic kernel multiplies float32 Jacobian chunks in column groups of
    # _ntk_generic.PRODUCT_GROUP parameters and accumulates them in float64: it must equal the
    # float64 product of the same float32 Jacobian to float32 rounding of a group's sum (~1e-7),
    # with any grouping and chunking. 1e-6 leaves a margin of 10 and still fails on a wrong group,
    # chunk or order (errors of order 1).
    from remlstop import _ntk_generic

    torch.manual_seed(5)
    model = tanh_mlp()  # float32, K = 3, P = 339
    x, x2 = torch.randn(10, 10), torch.randn(4, 10)
    J, J2 = model_dtype_jacobian(model, x), model_dtype_jacobian(model, x2)
    N = J.shape[0]
    H_ref, C_ref = J @ J.T / N, J2 @ J.T / N
    for group in (_ntk_generic.PRODUCT_GROUP, 100, 7):
        monkeypatch.setattr(_ntk_generic, "PRODUCT_GROUP", group)
        for chunk in (None, 1, 3, 4):
            H = empirical_ntk(model, x, path="generic", chunk_size=chunk)
            assert H.dtype == torch.float64 and torch.equal(H, H.T)
            assert rel_err(H, H_ref) < 1e-6, (group, chunk)
            C = empirical_ntk(model, x, x2, path="generic", chunk_size=chunk)
            assert rel_err(C, C_ref) < 1e-6, (group, chunk)


def test_generic_working_dtype() -> None:
    from remlstop._ntk_generic import work_dtype

    assert work_dtype(torch.float32, torch.float64) == torch.float32
    assert work_dtype(torch.float64, torch.float64) == torch.float64
    assert work_dtype(torch.float64, torch.float32) == torch.float32
    assert work_dtype(torch.bfloat16, torch.float64) == torch.float32


@pytest.mark.parametrize("name", ["tanh_mlp_3_outputs", "cnn", "batchnorm_eval"])
def test_trace_and_vector_products_agree_with_dense_kernel(name: str) -> None:
    model, x = make(name, n=6)
    H = empirical_ntk(model, x)
    N = H.shape[0]
    assert ntk_trace(model, x) == pytest.approx(float(H.trace()), rel=1e-12)
    assert ntk_trace(model, x, chunk_size=4) == pytest.approx(float(H.trace()), rel=1e-12)
    v = torch.randn(N, dtype=torch.float64)
    hv = ntk_vector_product(model, x, v)
    assert hv.shape == (N,) and hv.dtype == torch.float64
    assert rel_err(hv, H @ v) < 1e-10
    V = torch.randn(N, 3, dtype=torch.float64)
    HV = ntk_vector_product(model, x, V, chunk_size=4)
    assert HV.shape == (N, 3)
    assert rel_err(HV, H @ V) < 1e-10


def test_float32_model_gives_float64_products() -> None:
    model, x = make("paper_mlp", n=5)
    H = empirical_ntk(model, x)
    v = torch.randn(5, dtype=torch.float64)
    assert ntk_vector_product(model, x, v).dtype == torch.float64
    assert rel_err(ntk_vector_product(model, x, v), H @ v) < 1e-5
    assert ntk_trace(model, x) == pytest.approx(float(H.trace()), rel=1e-6)


def test_output_shapes_define_K() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    scalar = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).double()  # output (n,)
    H, info = empirical_ntk(scalar, x, return_info=True)
    assert (info.K, H.shape) == (1, (5, 5))
    grid = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))).double()  # output (n, 2, 3)
    H, info = empirical_ntk(grid, x, return_info=True)
    assert (info.K, H.shape, info.path) == (6, (30, 30), "layerwise")
    J = explicit_jacobian(grid, x)
    assert rel_err(H, J @ J.T / 30) < 1e-12


def test_info_and_device_arguments() -> None:
    model, x = make("tanh_mlp_3_outputs", n=4)
    H, info = empirical_ntk(model, x, device="cpu", return_info=True)
    assert isinstance(info, NTKInfo) and info.path == "layerwise"
    assert (info.n, info.K, info.N) == (4, 3, 12)
    assert torch.equal(H, empirical_ntk(model, x, device=torch.device("cpu")))
    with pytest.raises(ValueError, match="meta"):
        empirical_ntk(model, x, device="meta")
    with pytest.raises(ValueError, match="meta"):
        empirical_ntk(model.to("meta"), x)


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
    }


def assert_same(model: nn.Module, before: dict[str, object]) -> None:
    after = model.state_dict(keep_vars=True)
    for k, v in before["state"].items():
        assert torch.equal(after[k], v), k
    assert [m.training for m in model.modules()] == before["modes"]
    assert [p.requires_grad for p in model.parameters()] == before["flags"]
    for p, (grad, value) in zip(model.parameters(), before["grads"]):
        assert p.grad is grad
        if grad is not None:
            assert torch.equal(p.grad, value)


def stateful_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)
    ).double()
    model.train()
    model[2].eval()  # a mixed mode pattern that must survive
    model(torch.randn(16, 10, dtype=torch.float64)).sum().backward()  # .grad set, stats moved
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None
    return model


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: empirical_ntk(m, x),
        lambda m, x: empirical_ntk(m, x, x[:3], path="generic", chunk_size=2),
        lambda m, x: ntk_trace(m, x),
        lambda m, x: ntk_vector_product(m, x, torch.ones(2 * x.shape[0], 2, dtype=torch.float64)),
    ],
    ids=["kernel", "cross_generic", "trace", "vector_product"],
)
def test_model_state_is_unchanged(call) -> None:
    model = stateful_model()
    x = torch.randn(6, 10, dtype=torch.float64)
    before = snapshot(model)
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        call(model, x)
    after_draw = torch.rand(5)
    torch.manual_seed(1234)
    assert torch.equal(after_draw, torch.rand(5))  # the call consumed no random numbers
    assert_same(model, before)


def test_model_state_restored_after_an_error() -> None:
    model = stateful_model()
    before = snapshot(model)
    # The error is raised from inside the call, after the model was switched to eval mode.
    hook = model[4].register_forward_hook(lambda module, inputs, output: output * float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match="NaN or infinite"):
            empirical_ntk(model, torch.randn(4, 10, dtype=torch.float64))
    hook.remove()
    assert_same(model, before)


def test_dropout_and_batchnorm_in_train_mode_warn_and_use_eval_mode() -> None:
    model = stateful_model()
    x = torch.randn(6, 10, dtype=torch.float64)
    with (
        pytest.warns(UserWarning, match="dropout is active"),
        pytest.warns(UserWarning, match="batch normalisation in train mode"),
    ):
        H = empirical_ntk(model, x)
    reference = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(H, empirical_ntk(reference, x)) < 1e-12


def test_errors() -> None:
    model, x = make("tanh_mlp_3_outputs", n=4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        empirical_ntk(model, x.tolist())
    with pytest.raises(TypeError, match="nn.Module"):
        empirical_ntk(lambda t: t, x)
    nan_x = x.clone()
    nan_x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        empirical_ntk(model, nan_x)
    inf_x = x.clone()
    inf_x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        empirical_ntk(model, x, inf_x)
    with pytest.raises(ValueError, match="feature shape"):
        empirical_ntk(model, x, x[:, :5])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            empirical_ntk(model, x, chunk_size=bad)
    with pytest.raises(ValueError, match="path"):
        empirical_ntk(model, x, path="fast")
    with pytest.raises(ValueError, match="BatchNorm1d.*parameters outside"):
        empirical_ntk(bn_net(), torch.randn(3, 10, dtype=torch.float64), path="layerwise")
    frozen_model = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(frozen_model, x)
    with pytest.raises(ValueError, match="v must have shape"):
        ntk_vector_product(model, x, torch.ones(5, dtype=torch.float64))


class BatchMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean(0)  # one output for the whole batch


class NaNOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float("nan")


@pytest.mark.parametrize("path", ["auto", "generic"])
def test_bad_model_outputs(path: str) -> None:
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="first dimension must be the batch dimension"):
        empirical_ntk(BatchMean(), x, path=path)
    with pytest.raises(ValueError, match="NaN or infinite"):
        empirical_ntk(NaNOut(), x, path=path)


class _Wrapper(nn.Module):
    """A LightningModule-like wrapper: forward calls a supported Sequential."""

    def __init__(self, net: nn.Module, scale: float = 1.0):
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, x):
        return self.net(x) * self.scale


def test_wrapper_module_gets_the_layerwise_path_only_when_it_is_the_same_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(12, 4)
    H_direct = empirical_ntk(net, x)
    H, info = empirical_ntk(_Wrapper(net), x, return_info=True)
    assert info.path == "layerwise"
    torch.testing.assert_close(H, H_direct, rtol=0, atol=0)
    # A forward that changes the function must not be delegated: generic path, scaled kernel.
    H2, info2 = empirical_ntk(_Wrapper(net, scale=2.0), x, return_info=True)
    assert info2.path == "generic"
    torch.testing.assert_close(H2, 4 * H_direct, rtol=1e-5, atol=1e-6 * float(H2.abs().max()))
    x2 = torch.randn(5, 4)
    C, info3 = empirical_ntk(_Wrapper(net), x, x2, return_info=True)
    assert info3.path == "layerwise"
    torch.testing.assert_close(C, empirical_ntk(net, x, x2), rtol=0, atol=0)


def test_trace_and_products_use_the_kernels_dispatch() -> None:
    # One dispatch for all three functions: a wrapper's trace gets the layer-wise backend
    # through its delegate, as its kernel does; products always take the generic backend.
    from remlstop.ntk import _dispatch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    wrapper = _Wrapper(net)
    for operation in ("kernel", "trace"):
        backend = _dispatch(wrapper, x, "auto", operation)
        assert backend.path == "layerwise" and backend.network is net
    backend = _dispatch(wrapper, x, "auto", "product")
    assert backend.path == "generic" and backend.network is wrapper
    assert _dispatch(net, x, "generic", "trace").path == "generic"
    H = empirical_ntk(wrapper, x)
    assert ntk_trace(wrapper, x) == pytest.approx(float(H.trace()), rel=1e-12)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(ntk_vector_product(wrapper, x, v), H @ v, rtol=1e-10, atol=0)


def test_all_three_work_under_inference_mode() -> None:
    model, x = make("tanh_mlp_3_outputs", n=5)
    v = torch.randn(15, dtype=torch.float64)
    expected = (empirical_ntk(model, x), ntk_trace(model, x), ntk_vector_product(model, x, v))
    with torch.inference_mode():
        x_inf, v_inf = x.clone(), v.clone()  # inference tensors
        got = (
            empirical_ntk(model, x_inf, path="generic"),
            ntk_trace(model, x_inf),
            ntk_vector_product(model, x_inf, v_inf),
        )
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=0)
    assert got[1] == pytest.approx(expected[1], rel=1e-12)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-12, atol=0)


def test_a_model_torch_func_cannot_batch_falls_back_to_one_row_at_a_time() -> None:
    # nn.PReLU's backward has no working batching rule under vmap(jacrev) in torch 2.13.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.PReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(9, 3, dtype=torch.float64)
    J = explicit_jacobian(model, x)
    with pytest.warns(RuntimeWarning, match="one row at a time"):
        H = empirical_ntk(model, x, chunk_size=4)
    assert rel_err(H, J @ J.T / J.shape[0]) < 1e-12
    with pytest.warns(RuntimeWarning, match="one row at a time"):
        assert ntk_trace(model, x) == pytest.approx(float(H.trace()), rel=1e-12)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert rel_err(ntk_vector_product(model, x, v), H @ v) < 1e-10


def test_a_model_that_fails_on_one_row_raises_its_own_error() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) @ torch.ones(3, 1)  # (rows, 2) @ (3, 1): wrong inner size

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        empirical_ntk(Broken(), torch.randn(4, 3), path="generic")


def test_running_out_of_memory_under_vmap_is_not_taken_for_a_missing_batching_rule() -> None:
    class Hungry(nn.Module):
        """Out of memory in its first call under torch.func (the batched one), fine after."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.failed = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch._C._functorch.is_functorch_wrapped_tensor(x) and not self.failed:
                self.failed = True
                raise torch.OutOfMemoryError("out of memory (simulated)")
            return self.fc(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "one row at a time" fallback warning
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            empirical_ntk(Hungry(), torch.randn(4, 3), path="generic")


def test_vmap_jacrev_is_sub_chunked_on_a_cpu_only():
    from remlstop._ntk_generic import _JACREV_BYTES, _call_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert _call_rows(1000, 2**20, cpu) == _JACREV_BYTES // 2**20 == 24
    assert _call_rows(10, 2**20, cpu) == 10
    assert _call_rows(1000, 2**30, cpu) == 1
    assert _call_rows(1000, 2**20, cuda) == 1000  # the caching allocator reuses any size
