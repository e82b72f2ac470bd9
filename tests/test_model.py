"""Model handling (remlstop._model): every forward the library makes leaves the model as found,
works under inference mode, casts inputs to the model's dtype and says what a bad output is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from remlstop import REMLStopper, _model, empirical_ntk


def repro() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    X = torch.randn(120, 5)
    Y = torch.sin(2 * X[:, :1])
    return m, X, Y, torch.optim.SGD(m.parameters(), lr=0.05)


class SideEffects(nn.Module):
    """A forward that counts its calls in place and replaces an EMA buffer by a new tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.ema = 0.9 * self.ema + 0.1 * x.mean(0)
        return self.net(x)


class TupleOut(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out, out.detach()


def buffer_snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (b, b.detach().clone()) for name, b in model.named_buffers()}


def assert_buffers_untouched(model: nn.Module, saved: dict) -> None:
    now = dict(model.named_buffers())
    assert now.keys() == saved.keys()
    for name, (obj, value) in saved.items():
        assert now[name] is obj, name
        assert torch.equal(now[name], value), name


def test_start_and_trajectory_checks_leave_forward_side_effects_undone() -> None:
    net, X, Y, opt = repro()
    model = SideEffects(net)
    saved = buffer_snapshot(model)
    stopper = REMLStopper(model, X, Y, optimizer=opt, rule="trajectory")
    stopper.start()
    assert_buffers_untouched(model, saved)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * ((net(X) - Y) ** 2).mean()).backward()  # trains the inner net: no buffer change
        opt.step()
        stopper.step()
    assert len(stopper.history) == 3 and all(c.D is not None for c in stopper.history)
    assert_buffers_untouched(model, saved)


def test_start_works_under_inference_mode() -> None:
    m, X, Y, opt = repro()
    expected = REMLStopper(m, X, Y, optimizer=opt).start()
    with torch.inference_mode():
        decision = REMLStopper(m, X, Y, optimizer=opt).start()
        X_inf, Y_inf = X.clone(), Y.clone()  # inference tensors: not usable by autograd as is
        from_inference_tensors = REMLStopper(m, X_inf, Y_inf, optimizer=opt).start()
    for d in (decision, from_inference_tensors):
        assert d.train == expected.train
        assert d.t_target == pytest.approx(expected.t_target, rel=1e-12)
        assert d.test.pvalue == pytest.approx(expected.test.pvalue, rel=1e-12)


def test_tuple_output_error_names_the_callbacks_model_option() -> None:
    net, X, Y, opt = repro()
    match = r"forward returns a tuple.*tensor of shape \(n,\) or \(n, K\).*model="
    with pytest.raises(ValueError, match=match):
        REMLStopper(TupleOut(net), X, Y, optimizer=opt).start()
    for path in ("auto", "generic"):
        with pytest.raises(ValueError, match=match):
            empirical_ntk(TupleOut(net), X, path=path)


def test_float64_inputs_into_a_float32_model() -> None:
    m, X, Y, opt = repro()
    expected = REMLStopper(m, X, Y, optimizer=opt).start()
    decision = REMLStopper(m, X.double(), Y.double(), optimizer=opt).start()
    assert decision.train == expected.train
    assert decision.t_target == pytest.approx(expected.t_target, rel=1e-6)
    assert decision.target_steps == pytest.approx(expected.target_steps, rel=1e-6)
    assert decision.test.pvalue == pytest.approx(expected.test.pvalue, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# _model's parts.
# ---------------------------------------------------------------------------------------------


class Mutating(nn.Module):
    """A forward that writes a parameter in place, replaces a Parameter, draws random numbers
    and switches a sub-module's mode: everything preserved() must undo."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight.mul_(2.0)
        self.fc.bias = nn.Parameter(torch.zeros(2))
        self.seen = self.seen + x.sum(0)
        self.drop.train()
        self.fc.weight.requires_grad_(False)
        return self.fc(x) + torch.rand(x.shape[0], 1)


def test_preserved_restores_objects_values_flags_modes_and_rng() -> None:
    torch.manual_seed(0)
    model = Mutating().eval()
    model.fc.weight.grad = torch.ones(2, 3)
    objects = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    values = {k: t.detach().clone() for k, t in objects.items()}
    grad = model.fc.weight.grad
    rng = torch.get_rng_state()
    with _model.preserved(model):
        model(torch.randn(4, 3))
    now = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert now.keys() == objects.keys()
    for k, t in objects.items():
        assert now[k] is t and torch.equal(t, values[k]), k
    assert model.fc.weight.grad is grad and model.fc.weight.requires_grad
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_evaluate_is_eval_mode_without_gradients_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.9), nn.Linear(4, 2)).train()
    x = torch.randn(6, 3)
    out = _model.evaluate(model, x)
    assert out.shape == (6, 2) and not out.requires_grad
    assert torch.equal(out, model.eval()(x).detach())  # dropout off
    model.train()
    assert torch.equal(_model.evaluate(model, x), out) and model.training


def test_evaluate_casts_floating_inputs_to_the_models_dtype() -> None:
    model = nn.Linear(3, 1)  # float32
    x = torch.randn(5, 3, dtype=torch.float64)
    out = _model.evaluate(model, x)
    assert out.dtype == torch.float32
    assert torch.equal(out, model(x.float()).detach())
    tokens = torch.tensor([[0], [2], [1]])
    embedding = nn.Sequential(nn.Embedding(3, 2), nn.Flatten())
    assert _model.model_inputs(tokens, torch.device("cpu"), torch.float32).dtype == torch.long
    assert _model.evaluate(embedding, tokens).shape == (3, 2)


def test_model_inputs_clone_inference_tensors_outside_inference_mode() -> None:
    cpu = torch.device("cpu")
    with torch.inference_mode():
        x = torch.randn(3, 2)
        assert _model.model_inputs(x, cpu, torch.float32).is_inference()  # no copy needed
    normal = _model.model_inputs(x, cpu, torch.float32)
    assert not normal.is_inference() and torch.equal(normal, x)


@pytest.mark.parametrize(
    "out, match",
    [
        ({"f": torch.zeros(4, 1)}, r"forward returns a dict.*\(n,\) or \(n, K\).*model="),
        (torch.zeros(()), r"shape \(\) for a batch of 4 rows.*batch dimension.*model="),
        (torch.zeros(3, 1), r"shape \(3, 1\) for a batch of 4 rows"),
        (torch.zeros(4, 1, dtype=torch.long), "floating point"),
        (torch.full((4, 2), float("nan")), "NaN or infinite"),
    ],
)
def test_check_outputs_says_what_is_wrong(out: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model.check_outputs(out, 4)


def test_check_outputs_gives_K_and_can_skip_values() -> None:
    assert _model.check_outputs(torch.zeros(4), 4) == 1
    assert _model.check_outputs(torch.zeros(4, 2, 3), 4) == 6
    assert _model.check_outputs(torch.full((4, 1), float("inf")), 4, finite=False) == 1


def test_device_dtype() -> None:
    cpu = torch.device("cpu")
    assert _model.device_dtype(nn.ReLU()) == (cpu, None)
    assert _model.device_dtype(nn.BatchNorm1d(2).double()) == (cpu, torch.float64)
    frozen_first = nn.Sequential(nn.Linear(2, 2).double().requires_grad_(False), nn.Linear(2, 1))
    assert _model.device_dtype(frozen_first) == (cpu, torch.float32)  # the trainable one
    with pytest.raises(ValueError, match="meta device"):
        _model.device_dtype(nn.Linear(2, 1, device="meta"))


def test_a_model_on_mps_is_refused_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # No MPS here: a parameter that says it lives there is enough for the check.
    class OnMPS:
        device, dtype, requires_grad = torch.device("mps"), torch.float32, True

        def is_floating_point(self) -> bool:
            return True

    model = nn.Linear(2, 1)
    monkeypatch.setattr(model, "parameters", lambda: iter([OnMPS()]))
    with pytest.raises(ValueError, match=r"MPS device, which has no float64.*model\.cpu\(\)"):
        _model.device_dtype(model)


class FakeGenerator:
    def __init__(self) -> None:
        self.seeded: list[int] = []

    def initial_seed(self) -> int:
        return 7

    def manual_seed(self, seed: int) -> None:
        self.seeded.append(seed)


def test_rng_state_does_not_initialise_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA not initialised: its states are not read (that would initialise it); if the body
    # initialises it, its generators go back to their initial seeds.
    def refuse() -> None:
        raise AssertionError("reading CUDA RNG states initialises CUDA")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
    state = _model.rng_state()
    assert state.cuda is None
    generators = [FakeGenerator(), FakeGenerator()]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "default_generators", generators, raising=False)
    _model.restore_rng_state(state)
    assert [g.seeded for g in generators] == [[7], [7]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_is_restored_on_every_device() -> None:
    torch.cuda.init()
    before = torch.cuda.get_rng_state_all()
    with _model.preserved_rng():
        for i in range(torch.cuda.device_count()):
            torch.rand(3, device=f"cuda:{i}")
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


class PrecisionProbe(nn.Module):
    """Records the backends' float32 precision settings at every forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[list[str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append([h.fp32_precision for h in _model._precision_handles()])
        return self.net(x)


@pytest.mark.skipif(not _model._precision_handles(), reason="torch < 2.9: legacy TF32 flags")
def test_kernel_and_outputs_run_in_ieee_float32_and_the_users_tf32_setting_is_restored() -> None:
    # TF32 (cuDNN convolutions' default on recent GPUs) would put a float32 kernel 1e-4 off.
    handles = _model._precision_handles()
    original = [h.fp32_precision for h in handles]
    try:
        for h in handles:
            h.fp32_precision = "tf32"
        net, X, Y, opt = repro()
        model = PrecisionProbe(net)
        empirical_ntk(model, X, path="generic")
        REMLStopper(model, X, Y, optimizer=opt).start()
        assert len(model.seen) >= 2
        assert all(seen == ["ieee"] * len(handles) for seen in model.seen)
        assert [h.fp32_precision for h in handles] == ["tf32"] * len(handles)
    finally:
        for h, value in zip(handles, original, strict=True):
            h.fp32_precision = value


def test_legacy_tf32_flags_are_turned_off_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    matmul, cudnn = SimpleNamespace(allow_tf32=True), SimpleNamespace(allow_tf32=True)
    monkeypatch.setattr(_model, "_precision_handles", lambda: [])
    monkeypatch.setattr(torch.backends, "cuda", SimpleNamespace(matmul=matmul))
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    with _model.full_float32_precision():
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
    assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)


def test_the_example_networks_leave_every_generator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from remlstop.datasets import lenet, paper_mlp

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("touches CUDA's generators (reading them starts CUDA)")

    for name in ("get_rng_state", "get_rng_state_all", "manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    before = torch.get_rng_state()
    a, b = lenet(seed=3), lenet(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    paper_mlp(width=8, seed=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_autocast_around_the_library_does_not_reach_its_forwards() -> None:
    # A bfloat16 forward would put the kernel and f0 about 1e-2 off.
    net, X, Y, opt = repro()
    kernels = {path: empirical_ntk(net, X, path=path) for path in ("layerwise", "generic")}
    decision = REMLStopper(net, X, Y, optimizer=opt).start()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(X).dtype == torch.bfloat16  # autocast is on out here
        for path, kernel in kernels.items():
            assert torch.equal(empirical_ntk(net, X, path=path), kernel), path
        again = REMLStopper(net, X, Y, optimizer=opt).start()
    assert again.t_target == decision.t_target and again.test.pvalue == decision.test.pvalue
