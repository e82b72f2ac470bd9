"""Misuse and faults the stopper must name instead of mis-stopping silently."""

import warnings

import pytest
import torch
from torch import nn

from remlstop import REMLStopper, empirical_ntk


def _repro(seed=0, lr=0.05):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    X = torch.randn(120, 5)
    Y = torch.sin(2 * X[:, :1])
    return m, X, Y, torch.optim.SGD(m.parameters(), lr=lr)


def _gd(m, opt, X, Y):
    opt.zero_grad()
    (0.5 * ((m(X) - Y) ** 2).mean()).backward()
    opt.step()


def test_optimizer_of_another_model_is_refused():
    m, X, Y, _ = _repro()
    other = torch.optim.SGD(nn.Linear(5, 1).parameters(), lr=0.05)
    with pytest.raises(ValueError, match="updates none of the model's"):
        REMLStopper(m, X, Y, optimizer=other).start()


def test_kernel_is_taken_over_the_parameters_the_optimizer_updates():
    m, X, Y, _ = _repro()
    head_only = torch.optim.SGD(m[2].parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="2 of the model's 4 trainable parameter tensors"):
        d = REMLStopper(m, X, Y, optimizer=head_only).start()
    for p in m[0].parameters():  # the body is untouched: still trainable afterwards
        assert p.requires_grad
    for p in m[0].parameters():
        p.requires_grad_(False)
    H_head = empirical_ntk(m, X)
    for p in m[0].parameters():
        p.requires_grad_(True)
    assert d.criteria.fits["reml"].spectrum.trace == pytest.approx(
        float(torch.trace(H_head)), rel=1e-9
    )


def test_unstable_step_size_warns_at_start_and_divergence_is_reported_as_such():
    m, X, Y, opt = _repro(lr=10.0)
    with pytest.warns(RuntimeWarning, match="step size is unstable"):
        stopper = REMLStopper(m, X, Y, optimizer=opt, rule="trajectory")
        stopper.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            _gd(m, opt, X, Y)
            if stopper.step():
                break
    assert stopper.stopping_reason.startswith("diverged")
    assert any("diverged" in str(w.message) for w in caught)
    # The time rule says that its stop came with an unstable step size.
    m, X, Y, opt = _repro(lr=10.0)
    with pytest.warns(RuntimeWarning, match="step size is unstable"):
        stopper = REMLStopper(m, X, Y, optimizer=opt, criterion="reml")
        stopper.start()
    while not stopper.step():
        _gd(m, opt, X, Y)
    assert "unstable step size" in stopper.stopping_reason


def test_a_stable_step_size_does_not_warn():
    m, X, Y, opt = _repro(lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message="misfit")
        REMLStopper(m, X, Y, optimizer=opt).start()


def test_start_again_after_training_began_is_refused():
    m, X, Y, opt = _repro()
    stopper = REMLStopper(m, X, Y, optimizer=opt)
    d = stopper.start()
    assert stopper.start() is d  # before any step: the same decision, nothing recomputed
    _gd(m, opt, X, Y)
    stopper.step()
    with pytest.raises(RuntimeError, match="decision was made at the initial parameters"):
        stopper.start()


def test_step_after_load_state_dict_without_start_says_what_to_do():
    m, X, Y, opt = _repro()
    stopper = REMLStopper(m, X, Y, optimizer=opt)
    stopper.start()
    _gd(m, opt, X, Y)
    stopper.step()
    resumed = REMLStopper(m, X, Y, optimizer=opt)
    resumed.load_state_dict(stopper.state_dict())
    with pytest.raises(RuntimeError, match="call start\\(\\) before step\\(\\)"):
        resumed.step()
    resumed.start()
    assert resumed.step() is False


def test_a_refresh_takes_the_kernel_over_the_optimizers_parameters_too():
    m, X, Y, _ = _repro()
    head_only = torch.optim.SGD(m[2].parameters(), lr=1e-6)
    with pytest.warns(RuntimeWarning, match="trainable parameter tensors"):
        stopper = REMLStopper(m, X, Y, optimizer=head_only, refresh_every_n_steps=1)
        decision = stopper.start()
    _gd(m, head_only, X, Y)
    stopper.step()
    # A step of 1e-6 barely moves the head: the refreshed kernel is the initial one, over the
    # head's parameters (over all of them it would be another kernel and stop time).
    check = next(c for c in stopper.history if c.t_hat is not None)
    assert check.drift == pytest.approx(0.0, abs=1e-4)
    assert check.t_hat == pytest.approx(decision.t_target, rel=1e-3)


def test_parameters_the_optimizer_updates_outside_the_model_are_warned_of():
    m, X, Y, _ = _repro()
    extra = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([*m.parameters(), extra], lr=0.05)
    with pytest.warns(RuntimeWarning, match="also updates 1 parameter tensor"):
        REMLStopper(m, X, Y, optimizer=opt).start()


def _started(width=64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 1))
    X = torch.randn(120, 5)
    Y = torch.sin(2 * X[:, :1])
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    stopper = REMLStopper(m, X, Y, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopper.start()
    return stopper, m, X, Y


def test_a_state_from_another_network_or_a_malformed_one_is_refused():
    stopper, _, X, Y = _started(width=8)  # 5*8 + 8 + 8 + 1 = 57 trained parameters
    state = stopper.state_dict()
    wider, _, _, _ = _started(width=32)
    with pytest.raises(ValueError, match="saved for a network with 57 parameters"):
        wider.load_state_dict(state)
    with pytest.raises(ValueError, match=r"not a REMLStopper state: it lacks \['clock'"):
        wider.load_state_dict({"weights": 1})
    same, _, _, _ = _started(width=8)
    cut = {**state, "baseline": {**state["baseline"], "u0": state["baseline"]["u0"][:100]}}
    with pytest.raises(ValueError, match="its residual has 100 entries for n x K = 120"):
        same.load_state_dict(cut)
    # As many parameters (5*6 + 6 + 6*3 + 3 = 57) but three outputs: the resume says so.
    torch.manual_seed(0)
    three = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    other = REMLStopper(three, X, Y, optimizer=torch.optim.SGD(three.parameters(), lr=0.05))
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved for n = 120 rows of K = 1 outputs.*3 outputs"):
        other.resume()


def test_batch_rows_of_a_sum_reduced_step_must_be_positive_integers():
    torch.manual_seed(0)
    m, X, Y, opt = _repro()
    stopper = REMLStopper(m, X, Y, optimizer=opt, loss="half_sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopper.start()
    for rows in ([3, 0], [-5, 5], [2.5, 3]):
        with pytest.raises(ValueError, match="batch_rows must be positive integers"):
            stopper.step_time(rows)
    with pytest.raises(TypeError, match="dt must be a number"):
        stopper.step(dt="a")
