"""Tests for remlstop.clock (METHOD M2)."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from torch import nn

from remlstop.clock import (
    GradientFlowClock,
    LossSpec,
    continuous_residual_factor,
    discrete_residual_factor,
    is_discrete_stable,
    loss_matched_time,
    parse_loss,
)


def _params(k=1):
    return [nn.Parameter(torch.zeros(3)) for _ in range(k)]


def _sgd(lr=0.1, **kw):
    return torch.optim.SGD(_params(), lr=lr, **kw)


# --- losses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, a, reduction",
    [
        ("half_mse", 0.5, "mean"),
        ("mse", 1.0, "mean"),
        ("half_sum", 0.5, "sum"),
        ("sum", 1.0, "sum"),
        (nn.MSELoss(), 1.0, "mean"),
        (nn.MSELoss(reduction="sum"), 1.0, "sum"),
    ],
)
def test_parse_loss(loss, a, reduction):
    spec = parse_loss(loss)
    assert (spec.a, spec.reduction) == (a, reduction)
    assert parse_loss(spec) is spec


def test_mse_none_reduction_refused():
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        parse_loss(nn.MSELoss(reduction="none"))


@pytest.mark.parametrize(
    "loss",
    [
        "cross_entropy",
        "nll",
        "bce",
        nn.CrossEntropyLoss(),
        nn.NLLLoss(),
        nn.BCELoss(),
        nn.BCEWithLogitsLoss(),
    ],
)
def test_classification_refused(loss):
    with pytest.raises(ValueError, match="squared-error.*one-hot.*loss='mse'"):
        parse_loss(loss)
    with pytest.raises(ValueError, match="one-hot"):
        GradientFlowClock(_sgd(), loss)


def test_unknown_loss_lists_names():
    with pytest.raises(ValueError, match=r"\['half_mse', 'half_sum', 'mse', 'sum'\]"):
        parse_loss("huber")
    with pytest.raises(TypeError):
        parse_loss(3)


def test_dt_per_loss():
    # Δt = 2aη (M2); sum reduction multiplies by the residuals summed, B·K.
    assert GradientFlowClock(_sgd(0.1), "half_mse").dt_per_step() == pytest.approx(0.1, rel=1e-15)
    assert GradientFlowClock(_sgd(0.1), "mse").dt_per_step() == pytest.approx(0.2, rel=1e-15)
    half_sum = GradientFlowClock(_sgd(0.1), "half_sum", n_total=50)
    assert half_sum.dt_per_step(n_outputs=2) == pytest.approx(0.1 * 100, rel=1e-15)
    assert half_sum.dt_per_step(batch_size_rows=8, n_outputs=2) == pytest.approx(
        0.1 * 16, rel=1e-15
    )
    # mean reduction ignores the batch size: the expected mini-batch update is the full one
    assert GradientFlowClock(_sgd(0.1), "mse").dt_per_step(
        batch_size_rows=8, n_outputs=3
    ) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="batch_size_rows"):
        GradientFlowClock(_sgd(0.1), "sum").dt_per_step()


def test_sum_time_matches_mean_time_for_the_same_update():
    # Summed loss with lr η moves parameters like mean loss with lr η·N: same time.
    n, k, eta = 20, 3, 1e-3
    t_sum = GradientFlowClock(_sgd(eta), "sum", n_total=n).dt_per_step(n_outputs=k)
    t_mean = GradientFlowClock(_sgd(eta * n * k), "mse").dt_per_step()
    assert t_sum == pytest.approx(t_mean, rel=1e-14)


def test_sum_gradient_step_matches_flow_time_on_linear_model():
    # Linear model f = Xθ: one GD step on the summed loss must move f by -Δt·H(f - y), H = XXᵀ/N.
    torch.manual_seed(0)
    n, p, eta = 6, 4, 1e-3
    X = torch.randn(n, p, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64)
    theta = nn.Parameter(torch.zeros(p, dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=eta)
    clock = GradientFlowClock(opt, "half_sum", n_total=n)
    f0 = (X @ theta).detach().clone()
    (0.5 * ((X @ theta - y) ** 2).sum()).backward()
    dt = clock.dt_per_step()
    opt.step()
    H = X @ X.T / n
    expected = f0 - dt * H @ (f0 - y)
    torch.testing.assert_close((X @ theta).detach(), expected, rtol=1e-12, atol=1e-14)


# --- learning rate read live ------------------------------------------------------------------


def test_steplr_read_live():
    opt = _sgd(0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    clock = GradientFlowClock(opt, "half_mse")
    dts = []
    for _ in range(7):
        opt.step()
        dts.append(clock.dt_per_step())
        clock.advance()
        sched.step()
    assert dts == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025], rel=1e-14)
    assert clock.t == pytest.approx(sum(dts), rel=1e-14)
    assert clock.steps == 7


def test_lambdalr_warmup_read_live():
    opt = _sgd(0.2)
    warm = 4
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    clock = GradientFlowClock(opt, "mse")
    ts = []
    for _ in range(6):
        opt.step()
        ts.append(clock.advance())
        sched.step()
    increments = np.diff([0.0] + ts)
    expected = [2 * 0.2 * min(1.0, (s + 1) / warm) for s in range(6)]
    np.testing.assert_allclose(increments, expected, rtol=1e-13)


# --- momentum ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_factor(nesterov):
    clock = GradientFlowClock(_sgd(0.1, momentum=0.9, nesterov=nesterov), "half_mse")
    # Step 1: the buffer holds g alone; Nesterov steps along g + β·g.
    assert clock.dt_per_step() == pytest.approx(0.1 * (1.9 if nesterov else 1.0), rel=1e-14)
    for _ in range(1000):  # the buffer builds up: the steady state 1/(1 - β)
        clock.advance()
    assert clock.dt_per_step() == pytest.approx(0.1 / (1 - 0.9), rel=1e-14)
    assert clock.fixed_map


def _step_is_its_move(clock, opt, w, step):
    """One optimizer step under a unit gradient, whose Δt (2aη = η) must equal w's move."""
    dt = clock.dt_per_step()
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    opt.step()
    assert float(before - w.detach()) == pytest.approx(dt, rel=1e-12), step
    clock.count(dt)


@pytest.mark.parametrize("schedule", ["one_cycle", "by_hand", "nesterov_cyclic", "dampening"])
def test_each_steps_time_is_the_move_of_a_constant_gradient_when_momentum_changes(schedule):
    # With g = 1 and 2aη = η, a step's Δt must equal the parameter's move, whatever the momentum
    # did before: the clock follows the buffer's recursion, not a closed form in the step index.
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    nesterov = schedule == "nesterov_cyclic"
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.9 if nesterov else 0.0, nesterov=nesterov)
    sched = None
    if schedule == "one_cycle":
        opt.param_groups[0]["momentum"] = 0.9
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=80)
    elif nesterov:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, 0.001, 0.02, step_size_up=10)
    clock = GradientFlowClock(opt, "half_mse")
    for step in range(1, 61):
        if schedule == "by_hand" and step in (20, 40):
            opt.param_groups[0]["momentum"] = {20: 0.9, 40: 0.5}[step]
        if schedule == "dampening" and step in (1, 30):
            opt.param_groups[0].update(momentum=0.8, dampening={1: 0.0, 30: 0.6}[step])
        _step_is_its_move(clock, opt, w, step)
        if sched is not None:
            sched.step()
    # The projection ahead continues the same recursion at the lr and momentum now.
    before = w.detach().clone()
    for _ in range(10):
        w.grad = torch.ones_like(w)
        opt.step()
    assert clock.steps_for_time(float(before - w.detach())) == pytest.approx(10.0, rel=1e-9)


def test_a_clock_state_keeps_the_momentum_buffer_and_older_states_rebuild_it() -> None:
    opt = _sgd(0.1, momentum=0.9)
    clock = GradientFlowClock(opt, "half_mse")
    for _ in range(7):
        clock.advance()
    resumed = GradientFlowClock(_sgd(0.1, momentum=0.9), "half_mse")
    resumed.load_state_dict(clock.state_dict())
    assert resumed.dt_per_step() == pytest.approx(clock.dt_per_step(), rel=1e-14)
    old = {k: v for k, v in clock.state_dict().items() if k != "momentum_buffer"}
    rebuilt = GradientFlowClock(_sgd(0.1, momentum=0.9), "half_mse")
    rebuilt.load_state_dict(old)  # constant momentum: the buffer at step 7 in closed form
    assert rebuilt.dt_per_step() == pytest.approx(clock.dt_per_step(), rel=1e-12)


def test_dampening_factor():
    clock = GradientFlowClock(_sgd(0.1, momentum=0.9, dampening=0.5), "half_mse")
    assert clock.dt_per_step() == pytest.approx(0.1, rel=1e-14)  # PyTorch: step 1 undampened
    for _ in range(1000):
        clock.advance()
    assert clock.dt_per_step() == pytest.approx(0.1 * 0.5 / 0.1, rel=1e-14)


def test_momentum_steady_state_matches_factor():
    # Constant gradient: the heavy-ball update tends to η·g/(1 - β). A clock made once the
    # momentum buffers exist counts that steady state from its first step.
    beta, lr = 0.8, 0.01
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr, momentum=beta)
    prev = w.detach().clone()
    for _ in range(200):
        w.grad = torch.ones_like(w)
        opt.step()
        move, prev = float(prev - w.detach()), w.detach().clone()
    clock = GradientFlowClock(opt, "half_mse")
    assert clock.warm_start
    assert move == pytest.approx(clock.dt_per_step() * 1.0, rel=1e-12)  # g = 1, 2aη = η
    assert move == pytest.approx(lr / (1 - beta), rel=1e-12)


# --- optimizers without a fixed map, weight decay, param groups ---------------------------------


@pytest.mark.parametrize(
    "cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad]
)
def test_adaptive_optimizers_warn_once(cls):
    kwargs = {"weight_decay": 0.0} if cls is torch.optim.AdamW else {}
    opt = cls(_params(), lr=1e-3, **kwargs)
    with pytest.warns(RuntimeWarning, match="no fixed map") as rec:
        clock = GradientFlowClock(opt, "mse")
    assert len(rec) == 1
    assert clock.fixed_map is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            clock.advance()
    assert clock.steps == 3


def test_weight_decay_warns_once():
    opt = _sgd(0.1, weight_decay=1e-4)
    with pytest.warns(RuntimeWarning, match="ridge") as rec:
        clock = GradientFlowClock(opt, "mse")
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clock.advance()


def test_weight_decay_added_later_warns():
    opt = _sgd(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clock = GradientFlowClock(opt, "mse")
    opt.param_groups[0]["weight_decay"] = 1e-3
    with pytest.warns(RuntimeWarning, match="ridge"):
        clock.advance()


def test_different_lr_groups_refused():
    p1, p2 = _params(2)
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 0.01}], lr=0.1)
    clock = GradientFlowClock(opt, "mse")
    with pytest.raises(ValueError, match="one time for all parameters"):
        clock.dt_per_step()


def test_empty_group_with_other_lr_is_ignored():
    (p1,) = _params(1)
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [], "lr": 0.01}], lr=0.1)
    assert GradientFlowClock(opt, "half_mse").dt_per_step() == pytest.approx(0.1)


def test_same_lr_groups_accepted():
    p1, p2 = _params(2)
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=0.05)
    assert GradientFlowClock(opt, "mse").dt_per_step() == pytest.approx(0.1)


# --- state ------------------------------------------------------------------------------------


def test_state_dict_round_trip():
    clock = GradientFlowClock(_sgd(0.1), "mse")
    for _ in range(5):
        clock.advance()
    other = GradientFlowClock(_sgd(0.1), "mse")
    other.load_state_dict(clock.state_dict())
    assert (other.t, other.steps) == (clock.t, clock.steps)
    other.advance()
    assert other.t == pytest.approx(6 * 0.2, rel=1e-14) and other.steps == 6
    with pytest.raises(ValueError, match="saved with loss"):
        GradientFlowClock(_sgd(0.1), "half_mse").load_state_dict(clock.state_dict())


# --- loss-matched clock -----------------------------------------------------------------------


def _synthetic(seed=0, n=40, zero=3):
    rng = np.random.default_rng(seed)
    lam = np.concatenate([np.zeros(zero), rng.gamma(0.5, 2.0, n - zero)])
    z = rng.normal(size=n)
    return lam, z


def _residual_norm2(lam, z, t):
    return float(np.sum(z**2 * np.exp(-2 * t * lam)))


@pytest.mark.parametrize("t_true", [1e-3, 0.1, 1.0, 37.0])
def test_loss_matched_time_recovers_t(t_true):
    lam, z = _synthetic()
    t = loss_matched_time(lam, z, _residual_norm2(lam, z, t_true))
    assert t == pytest.approx(t_true, rel=1e-10)


@pytest.mark.parametrize("c", [1e-6, 1e-3, 1.0, 1e3, 1e6])
def test_loss_matched_time_scales_inversely(c):
    lam, z = _synthetic(seed=1)
    r2 = _residual_norm2(lam, z, 0.7)
    t1 = loss_matched_time(lam, z, r2)
    assert loss_matched_time(c * lam, z, r2) == pytest.approx(t1 / c, rel=1e-10)


def test_loss_matched_time_edges():
    lam, z = _synthetic()
    total = float(np.sum(z**2))
    limit = float(np.sum(z[lam == 0] ** 2))
    assert loss_matched_time(lam, z, total) == 0.0
    assert loss_matched_time(lam, z, 2 * total) == 0.0
    assert loss_matched_time(lam, z, limit) == math.inf
    assert loss_matched_time(lam, z, 0.5 * limit) == math.inf
    assert loss_matched_time(lam[3:], z[3:], 0.0) == math.inf  # no null space: r → 0 only as t → ∞
    assert loss_matched_time(lam, np.zeros_like(z), 0.0) == 0.0
    assert loss_matched_time(np.zeros(4), np.ones(4), 2.0) == math.inf


def test_loss_matched_time_large_t_no_underflow():
    # e^{-2tλ} underflows in linear space at t = 1e4 with λ ≈ 1; the log-space solve must not.
    lam = np.array([0.0, 1.0, 2.0])
    z = np.array([1.0, 1e200, 1e200])
    t_true = 1e4
    log_excess = 2 * math.log(1e200) - 2 * t_true * 1.0  # dominant term, e^{-20000}·1e400 ≈ 0
    r2 = 1.0 + math.exp(log_excess)  # = 1 in floating point: the limit
    assert loss_matched_time(lam, z, r2) == math.inf
    t = loss_matched_time(lam[1:], z[1:], 1e-100)
    expected = (
        2 * math.log(1e200) + 100 * math.log(10)
    ) / 2.0  # z² e^{-2t} = 1e-100 (dominant λ=1)
    assert t == pytest.approx(expected, rel=1e-10)


def test_loss_matched_time_subnormal_eigenvalue_terminates():
    # 1/λ overflows for a subnormal λ; the root lies beyond the largest double.
    assert loss_matched_time([5e-324, 0.0], [1.0, 1.0], 1.5) == math.inf
    assert loss_matched_time([5e-324, 1.0], [1.0, 1.0], 1.5) == pytest.approx(
        math.log(2) / 2, rel=1e-10
    )
    # root near 3e308: 2t overflows before tλ does, which must not fake a root
    assert loss_matched_time([2.8e14, 2.225073858507203e-309], [1.0, 2.0], 1.0) == math.inf


@pytest.mark.parametrize(
    "lam, z, r2, match",
    [
        ([1.0, -0.5], [1.0, 1.0], 1.0, ">= 0"),
        ([1.0, 2.0], [1.0], 1.0, "same length"),
        ([1.0, np.nan], [1.0, 1.0], 1.0, "NaN"),
        ([1.0, 2.0], [1.0, np.inf], 1.0, "NaN or inf"),
        ([1.0, 2.0], [1.0, 1.0], -1.0, "residual_norm2"),
        ([1.0, 2.0], [1.0, 1.0], np.nan, "residual_norm2"),
        ([[1.0, 2.0]], [[1.0, 1.0]], 1.0, "1-D"),
    ],
)
def test_loss_matched_time_validates(lam, z, r2, match):
    with pytest.raises(ValueError, match=match):
        loss_matched_time(lam, z, r2)


_floats = st.floats(min_value=-1e150, max_value=1e150, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    lam=st.lists(
        st.floats(min_value=0.0, max_value=1e150, allow_nan=False), min_size=1, max_size=12
    ),
    z=st.lists(_floats, min_size=12, max_size=12),
    r2=st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False),
)
def test_loss_matched_time_never_nan(lam, z, r2):
    lam = np.array(lam)
    z = np.array(z[: lam.size])
    t = loss_matched_time(lam, z, r2)
    assert not math.isnan(t)
    assert t >= 0.0
    if 0.0 < t < math.inf:
        # the root is a root: matched in log space to many digits
        keep = z != 0
        with np.errstate(over="ignore"):
            log_lhs = logsumexp(2 * np.log(np.abs(z[keep])) - (t * lam[keep]) * 2)
        assert abs(log_lhs - math.log(r2)) < 1e-8 * max(1.0, abs(math.log(r2)))


# --- discrete versus continuous flow ----------------------------------------------------------


def test_residual_factors():
    lam = np.array([0.0, 0.5, 2.0])
    np.testing.assert_allclose(
        discrete_residual_factor(lam, 0.1, 3), (1 - 0.1 * lam) ** 3, rtol=1e-15
    )
    np.testing.assert_allclose(continuous_residual_factor(lam, 0.3), np.exp(-0.3 * lam), rtol=1e-15)
    assert is_discrete_stable(10.0, 0.19) and not is_discrete_stable(10.0, 0.2)


def _fitted_relative_error(x_max, k, seed=0, n=200):
    """‖discrete − continuous fitted values‖ / ‖continuous fitted values‖ after k steps, with
    spectrum scaled so that Δt·λ_max = x_max."""
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.sort(rng.gamma(0.5, 1.0, n))
    dt = x_max / lam[-1]
    u0 = rng.normal(size=n)
    z = V.T @ u0
    fit_cont = V @ ((1 - continuous_residual_factor(lam, k * dt)) * z)
    fit_disc = V @ ((1 - discrete_residual_factor(lam, dt, k)) * z)
    return np.linalg.norm(fit_disc - fit_cont) / np.linalg.norm(fit_cont)


def test_continuous_matches_discrete_at_small_steps():
    # First order: per direction the relative gap is about Δt·λ/2, so at Δt·λ_max = 0.02 the
    # fitted values after 10 steps agree within 1% (< the 2% METHOD M2 states).
    err10 = _fitted_relative_error(x_max=0.02, k=10)
    assert err10 < 0.02
    assert err10 < 0.5 * 0.02 * 1.05  # the first-order bound x_max/2, with 5% slack
    # The check can fail: with Δt·λ_max = 0.2 the gap is several percent.
    assert _fitted_relative_error(x_max=0.2, k=10) > 0.02
    # Same step after 1000 steps: below 0.02% (METHOD M2; 1.9e-4 for this seeded spectrum).
    assert _fitted_relative_error(x_max=0.02, k=1000) < 2e-4


def test_lightning_wrapped_sgd_has_fixed_map():
    pl = pytest.importorskip("lightning.pytorch")
    opt = pl.core.optimizer.LightningOptimizer(_sgd(0.1))
    clock = GradientFlowClock(opt, "half_mse")
    assert clock.fixed_map and clock.dt_per_step() == pytest.approx(0.1)


def test_lossspec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossSpec("mse", 1.0, "mean").a = 2.0


def test_maximize_is_refused_with_the_way_out():
    w = nn.Parameter(torch.zeros(1))
    clock = GradientFlowClock(torch.optim.SGD([w], lr=0.1, maximize=True), "half_mse")
    with pytest.raises(ValueError, match=r"maximize=True.*minimise the loss itself"):
        clock.dt_per_step()


def test_a_skipped_step_adds_no_time_and_leaves_the_momentum_count():
    # A GradScaler skips the first steps (inf gradients): the optimizer's buffer does not move,
    # so neither does the clock's, and every later step's Δt is still the parameter's move.
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    clock = GradientFlowClock(opt, "half_mse")
    for _ in range(3):
        clock.count(0.0, skipped=True)
    assert clock.t == 0.0 and clock.steps == 3
    for step in range(20):
        _step_is_its_move(clock, opt, w, step)
    with pytest.raises(ValueError, match="a skipped step moves nothing"):
        clock.count(0.1, skipped=True)
