"""Every criterion side by side, the misfit diagnostic, and the criterion option (METHOD M9)."""

import math
import warnings

import numpy as np
import pytest
import torch

from remlstop import CRITERIA, REMLStopper, StopperOptions, evaluate_criteria
from remlstop.criteria import MISFIT_NATS
from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.options import DEFAULT_CRITERION
from remlstop.spectrum import KernelSpectrum


def _exp_model_spectrum(seed: int, t: float = 3.0) -> KernelSpectrum:
    """z_j ~ N(0, e^{t lambda_j}): a draw from the paper's own model (M3)."""
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.exponential(0.3, 400))
    return KernelSpectrum.from_eigen(lam, rng.standard_normal(lam.size) * np.exp(0.5 * t * lam))


def _mid_range_spectrum(seed: int) -> KernelSpectrum:
    """Signal energy in the mid-range eigenvalues only, unit noise elsewhere: a shape the
    exp family (variance growing with lambda) cannot follow, the linear one can (Var ∝ lambda)."""
    rng = np.random.default_rng(seed)
    lam = np.geomspace(1e-4, 10.0, 400)
    var = 1.0 + 400.0 * lam * (lam < 1.0)
    return KernelSpectrum.from_eigen(lam, rng.standard_normal(lam.size) * np.sqrt(var))


@pytest.mark.parametrize("seed", range(5))
def test_misfit_flags_a_mid_range_spectrum_and_not_a_draw_from_the_exp_model(seed):
    assert evaluate_criteria(_mid_range_spectrum(seed)).misfit > MISFIT_NATS
    assert evaluate_criteria(_exp_model_spectrum(seed)).misfit <= MISFIT_NATS


def test_every_criterion_has_a_stop_time_and_auto_is_the_best_aic_family():
    c = evaluate_criteria(_mid_range_spectrum(0))
    assert set(c.fits) == set(CRITERIA)
    aic = {n: c.fits[n].loglik - c.fits[n].n_params for n in ("reml", "reml-linear", "reml-power")}
    assert c.auto_choice == max(aic, key=aic.get)
    assert c.fits["auto"] is c.fits[c.auto_choice]
    w = c.fits["average"].weights
    assert sum(w.values()) == pytest.approx(1.0)
    # Here the power family takes almost all the weight, so the average is its stop time.
    assert w["power"] > 0.99
    assert c.fits["average"].t == pytest.approx(c.fits["reml-power"].t, rel=1e-2)
    lines = c.lines(0.01, "gcv")
    assert len(lines) == len(CRITERIA) and lines[3].startswith("* gcv")


def test_on_the_exp_model_reml_stops_near_the_truth_and_late_rules_do_not_win_the_aic():
    c = evaluate_criteria(_exp_model_spectrum(0, t=3.0))
    assert c.fits["reml"].t == pytest.approx(3.0, rel=0.3)


def _setup(criterion=None, seed=0, **kw):
    x, y, _, _ = paper_simple_function(n=250, n_train=200, seed=seed)
    model = paper_mlp(width=64, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opts = {} if criterion is None else {"criterion": criterion}
    return model, opt, REMLStopper(model, x, y, optimizer=opt, **opts, **kw), x, y


def _train(model, opt, stopper, x, y, steps):
    for k in range(1, steps + 1):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).mean()).backward()
        opt.step()
        if stopper.step():
            return k
    return None


@pytest.mark.parametrize("criterion", ["reml-linear", "gcv", "average"])
def test_stopper_follows_the_chosen_criterion(criterion):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, opt, stopper, x, y = _setup(criterion)
        d = stopper.start()
    assert d.criterion == criterion == stopper.criterion
    assert d.t_target == d.criteria.fits[criterion].t
    assert d.fit is d.criteria.fits["reml"]
    text = d.summary()
    assert f"* {criterion}" in text and "misfit Delta" in text
    if math.isfinite(d.t_target):
        expected = math.ceil(d.t_target / d.dt_per_step - 0.5)
        assert _train(model, opt, stopper, x, y, expected + 5) == expected


def test_criterion_survives_state_dict_and_a_different_one_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, opt, stopper, x, y = _setup("gcv")
        stopper.start()
        _train(model, opt, stopper, x, y, 3)
        state = stopper.state_dict()
        resumed = REMLStopper(model, x, y, optimizer=opt, criterion="gcv")
        resumed.load_state_dict(state)
        d = resumed.start()
        assert d.criterion == "gcv" and d.t_target == stopper.decision.t_target
        with pytest.raises(ValueError, match="criterion='gcv'"):
            REMLStopper(model, x, y, optimizer=opt, criterion="reml").load_state_dict(state)


def test_reml_warns_when_the_data_reject_its_prior():
    # The same fixture where the misfit is large (seed 2 of the stopper tests' small net).
    x, y, _, _ = paper_simple_function(n=250, n_train=200, seed=2)
    model = paper_mlp(width=64, seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = REMLStopper(model, x, y, optimizer=opt, criterion="reml").start()
    rejected = [w for w in caught if "reject the paper's prior" in str(w.message)]
    assert bool(rejected) == d.criteria.prior_rejected


def test_options_are_validated_once_with_specific_messages():
    with pytest.raises(ValueError, match="criterion must be one of"):
        StopperOptions(criterion="aic")
    with pytest.raises(ValueError, match="rule='trajectory'"):
        StopperOptions(criterion="gcv", rule="trajectory")
    with pytest.raises(ValueError, match="max_samples"):
        StopperOptions(max_samples=0)
    with pytest.raises(TypeError, match="fields of StopperOptions"):
        REMLStopper(
            torch.nn.Linear(1, 1),
            None,
            optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1),
            critrion="gcv",
        )
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        REMLStopper(torch.nn.Linear(1, 1), None, optimizer=None)
    assert StopperOptions(rule="trajectory").track_residual is True
    # The trajectory rule is the paper's equation: it takes 'reml' unless told otherwise.
    assert StopperOptions(rule="trajectory").criterion == "reml"
    assert StopperOptions().criterion == DEFAULT_CRITERION
