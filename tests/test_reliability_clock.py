"""Reliability of the clock (METHOD M2): the momentum transient is counted step by step."""

import numpy as np
import pytest
import torch
from torch import nn

from remlstop.clock import GradientFlowClock
from remlstop.ntk import empirical_ntk
from remlstop.spectrum import KernelSpectrum

# (momentum, dampening, nesterov) -> multiplier of 2aη at step i (1-based), constant gradient.
CASES = {
    "heavy_ball": ((0.9, 0.0, False), lambda i: (1 - 0.9**i) / (1 - 0.9)),
    # PyTorch's first step copies the gradient into the buffer undampened.
    "dampened": ((0.9, 0.5, False), lambda i: 0.9 ** (i - 1) + 0.5 * (1 - 0.9 ** (i - 1)) / 0.1),
    # update g + β·buf with buf_i = (1 − β^i)/(1 − β)·g
    "nesterov": ((0.9, 0.0, True), lambda i: (1 - 0.9 ** (i + 1)) / (1 - 0.9)),
    "plain": ((0.0, 0.0, False), lambda i: 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_step_dt_follows_the_momentum_transient(case) -> None:
    (beta, damp, nesterov), multiplier = CASES[case]
    lr = 0.02
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr, momentum=beta, dampening=damp, nesterov=nesterov)
    clock = GradientFlowClock(opt, "half_mse")  # 2a = 1
    for i in range(1, 61):
        dt = clock.dt_per_step()
        assert clock.dt_per_step() == dt  # reading it does not count the step
        assert dt == pytest.approx(lr * multiplier(i), rel=1e-12)
        # ... and it is the move of an actual SGD step under a constant unit gradient.
        before = float(w.detach())
        w.grad = torch.ones_like(w)
        opt.step()
        assert before - float(w.detach()) == pytest.approx(dt, rel=1e-9)
        clock.advance()
    assert clock.t == pytest.approx(lr * sum(multiplier(i) for i in range(1, 61)), rel=1e-12)


def test_transient_survives_a_state_dict_round_trip_and_manual_counting() -> None:
    def clock() -> GradientFlowClock:
        return GradientFlowClock(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02, momentum=0.9), "half_mse"
        )

    a = clock()
    for _ in range(5):
        a.advance()
    b = clock()
    b.load_state_dict(a.state_dict())
    assert b.dt_per_step() == a.dt_per_step() == pytest.approx(0.02 * (1 - 0.9**6) / 0.1)
    # REMLStopper.step() counts by hand: read dt, then move t and steps.
    dt = b.dt_per_step()
    b.t += dt
    b.steps += 1
    a.advance()
    assert (b.t, b.steps) == (a.t, a.steps)


@pytest.mark.parametrize("case", ["heavy_ball", "nesterov", "dampened"])
def test_steps_for_time_inverts_the_cumulative_clock(case) -> None:
    (beta, damp, nesterov), multiplier = CASES[case]
    opt = torch.optim.SGD(
        [nn.Parameter(torch.zeros(1))], lr=0.02, momentum=beta, dampening=damp, nesterov=nesterov
    )
    clock = GradientFlowClock(opt, "half_mse")
    cumulative = np.cumsum([0.02 * multiplier(i) for i in range(1, 201)])
    for k in (1, 2, 7, 40, 200):
        assert clock.steps_for_time(float(cumulative[k - 1])) == pytest.approx(k, rel=1e-9)
    assert clock.steps_for_time(0.0) == 0.0 and clock.steps_for_time(float("inf")) == float("inf")
    for _ in range(7):  # counted from the clock's current step
        clock.advance()
    assert clock.steps_for_time(float(cumulative[39] - cumulative[6])) == pytest.approx(33)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_clock_matches_a_linearised_network(nesterov) -> None:
    """A model linear in its parameters (constant NTK): the clock's time at each step matches
    the gradient-flow time at which Σ z_j² e^{−2tλ_j} equals the observed ‖y − f_k‖² (M2)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 5, generator=g, dtype=torch.float64)
    Y = torch.sin(2 * X[:, :1])
    # Fixed random features, scaled so that ηλ_max/(1 − β)² ≈ 0.01: heavy ball's own
    # discretisation error (relative speed-up ≈ 95·ηλ per direction at β = 0.9) stays far
    # below the transient's offset of β/(1 − β) ≈ 9 steps.
    features = 0.02 * torch.tanh(X @ torch.randn(5, 64, generator=g, dtype=torch.float64))
    torch.manual_seed(1)
    model = nn.Linear(64, 1, bias=False).double()
    spectrum = KernelSpectrum.from_kernel(
        empirical_ntk(model, features), (Y - model(features)).detach().reshape(-1)
    )
    lam, z = spectrum.eigenvalues, spectrum.z
    lr, beta = 0.02, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta, nesterov=nesterov)
    clock = GradientFlowClock(opt, "half_mse")
    times, residuals = [], []
    for _ in range(200):
        opt.zero_grad()
        (0.5 * ((model(features) - Y) ** 2).mean()).backward()
        opt.step()
        times.append(clock.advance())
        residuals.append(float(((Y - model(features)).detach() ** 2).sum()))
    times, residuals = np.array(times), np.array(residuals)
    steady = np.arange(1, 201) * 2 * 0.5 * lr / (1 - beta)  # the former clock
    for t_target in (2.0, 4.0, 8.0, 16.0, 32.0):
        flow = float(np.sum(z**2 * np.exp(-2 * t_target * lam)))
        observed = int(np.argmin(np.abs(residuals - flow)))
        assert abs(int(np.argmin(np.abs(times - t_target))) - observed) <= 1
        assert abs(int(np.argmin(np.abs(steady - t_target))) - observed) >= 6


def test_warm_start_is_saved_and_old_states_load() -> None:
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.02, momentum=0.9)
    fresh = GradientFlowClock(opt, "half_mse")
    w.grad = torch.ones_like(w)
    opt.step()  # the momentum buffer now exists
    late = GradientFlowClock(opt, "half_mse")
    assert not fresh.warm_start and late.warm_start
    assert late.dt_per_step() == pytest.approx(0.02 / 0.1)
    resumed = GradientFlowClock(opt, "half_mse")
    resumed.load_state_dict(fresh.state_dict())  # the saved run counted the transient
    assert not resumed.warm_start and resumed.dt_per_step() == pytest.approx(0.02)
    old_format = {k: v for k, v in fresh.state_dict().items() if k != "warm_start"}
    resumed.load_state_dict(old_format)
    assert not resumed.warm_start  # kept from the state loaded before
    with pytest.raises(ValueError, match="non-negative"):
        fresh.steps_for_time(-1.0)
