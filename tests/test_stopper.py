import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.ntk import empirical_ntk
from remlstop.stopper import REMLStopper
from remlstop.vctest import variance_component_test


def _setup(seed=0, n=200, width=64, lr=0.05, noise_only=False, **kwargs):
    # The stopper's mechanics are checked against the paper's t-hat (decision.fit), so the
    # criterion is pinned to it whatever the default is.
    kwargs.setdefault("criterion", "reml")
    x, y, _, _ = paper_simple_function(n=n + 50, n_train=n, seed=seed)
    if noise_only:
        y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    model = paper_mlp(width=width, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stopper = REMLStopper(model, x, y, optimizer=opt, loss="half_mse", **kwargs)
    return model, opt, stopper, x, y


def _gd_step(model, opt, x, y):
    opt.zero_grad()
    loss = 0.5 * ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _run(model, opt, stopper, x, y, max_steps=3000, scheduler=None):
    for k in range(1, max_steps + 1):
        _gd_step(model, opt, x, y)
        stop = stopper.step()
        if scheduler is not None:
            scheduler.step()
        if stop:
            return k
    return None


def test_time_rule_stops_at_the_rounded_target_step():
    model, opt, stopper, x, y = _setup()
    decision = stopper.start()
    assert decision.train and decision.test.pvalue < 0.05
    assert decision.dt_per_step == pytest.approx(0.05)  # half-MSE: dt = 2 * 0.5 * lr
    expected = round(decision.fit.t / 0.05)
    assert 5 < expected < 3000
    assert _run(model, opt, stopper, x, y) == expected == stopper.stop_step
    assert "time rule" in stopper.stopping_reason
    assert stopper.step() is True  # latched


def test_decision_is_printable_and_states_units():
    _, _, stopper, _, _ = _setup()
    text = str(stopper.start())
    assert "TRAIN" in text and "t-hat" in text and "steps" in text and "layerwise" in text


def test_insignificant_test_stops_before_any_update():
    model, opt, stopper, x, y = _setup(noise_only=True, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    decision = stopper.start()
    assert not decision.test.train and not decision.train
    assert stopper.should_stop and stopper.stop_step == 0
    assert stopper.step() is True
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_insignificant_with_warn_trains_on():
    _, _, stopper, _, _ = _setup(noise_only=True, seed=3, on_insignificant="warn")
    with pytest.warns(UserWarning, match="no signal"):
        decision = stopper.start()
    assert decision.train and not stopper.should_stop


def test_scheduler_changes_the_stop_step_as_the_clock_says():
    model, opt, stopper, x, y = _setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.8)
    t_hat = stopper.start().fit.t
    t, k, expected = 0.0, 0, None
    lr = 0.05
    assert t_hat < lr * 40 / (1 - 0.8)  # reachable under the decaying schedule
    while expected is None:
        k += 1
        dt = lr * 0.8 ** ((k - 1) // 40)
        t += dt
        if t + 0.5 * dt >= t_hat:
            expected = k
    stop = _run(model, opt, stopper, x, y, scheduler=sched)
    assert stop == expected
    assert stop != round(t_hat / lr)


def test_a_warm_up_from_lr_0_decides_and_stops_where_its_clock_says():
    model, opt, stopper, x, y = _setup()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 10))
    decision = stopper.start()  # at lr = 0: no steps at the current learning rate
    assert decision.dt_per_step == 0.0 and math.isinf(decision.target_steps)
    assert "the learning rate is 0 now" in decision.summary()
    t_hat, t, expected = decision.fit.t, 0.0, None
    for k in range(1, 10_000):
        dt = 0.05 * min(1.0, (k - 1) / 10)
        t += dt
        if dt > 0 and t + 0.5 * dt >= t_hat:
            expected = k
            break
    assert _run(model, opt, stopper, x, y, scheduler=sched) == expected


def test_momentum_speeds_the_clock_up():
    model, opt, stopper, x, y = _setup(lr=0.01)
    opt.param_groups[0]["momentum"] = 0.5
    decision = stopper.start()
    # The first heavy-ball step moves like plain SGD; the steady state is 1/(1 - beta) faster.
    assert decision.dt_per_step == pytest.approx(0.01)
    k, t = 0, 0.0
    while t < decision.fit.t:
        k += 1
        t += 0.01 * (1 - 0.5**k) / 0.5
    assert k - 1 < decision.target_steps <= k


def test_adam_warns_and_uses_the_loss_matched_clock():
    x, y, _, _ = paper_simple_function(n=250, n_train=200)
    model = paper_mlp(width=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="no fixed map"):
        stopper = REMLStopper(model, x, y, optimizer=opt, criterion="reml")
        stopper.start()
    stop = _run(model, opt, stopper, x, y, max_steps=2000)
    assert stop is not None
    assert stopper.history[-1].t >= stopper.t_target - 1e-9 or stopper.history[-1].t > 0


def test_resume_from_state_dict_stops_on_the_same_step():
    model, opt, stopper, x, y = _setup(seed=1)
    stopper.start()
    full = _run(model, opt, stopper, x, y)

    model, opt, stopper, x, y = _setup(seed=1)
    stopper.start()
    for _ in range(full // 2):
        _gd_step(model, opt, x, y)
        assert not stopper.step()
    saved = (stopper.state_dict(), model.state_dict(), opt.state_dict())
    torch.save(saved, buf := __import__("io").BytesIO())
    buf.seek(0)
    state, model_state, opt_state = torch.load(buf, weights_only=True)

    model2 = paper_mlp(width=64, seed=99)
    model2.load_state_dict(model_state)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(opt_state)
    resumed = REMLStopper(model2, x, y, optimizer=opt2, loss="half_mse", criterion="reml")
    resumed.load_state_dict(state)
    decision = resumed.start()
    assert decision.fit.t == pytest.approx(stopper.decision.fit.t, rel=1e-12)
    k = full // 2 + _run(model2, opt2, resumed, x, y)
    assert k == full == resumed.stop_step


def _trajectory_run(x, y, split=None, data=None, **options):
    """Stop step of a full-batch run under the trajectory rule (which reads u0 row by row),
    checkpointed at step ``split`` and resumed in a fresh stopper after another global seed."""
    options = {"rule": "trajectory", "criterion": "reml", "loss": "half_mse", **options}
    model = paper_mlp(width=32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stopper = REMLStopper(model, data if data is not None else (x, y), optimizer=opt, **options)
    stopper.start()
    for k in range(1, 3001):
        _gd_step(model, opt, x, y)
        if stopper.step():
            return k
        if k == split:
            state = stopper.state_dict()
            torch.manual_seed(999)  # a new process: the loader shuffles otherwise
            stopper = REMLStopper(
                model, data if data is not None else (x, y), optimizer=opt, **options
            )
            stopper.load_state_dict(state)
            stopper.resume()
    return None


@pytest.mark.parametrize("kernel", ["dense", "nystrom"])
def test_a_resume_finds_the_saved_rows_in_a_shuffled_loader(kernel):
    from torch.utils.data import DataLoader, TensorDataset

    x, y, _, _ = paper_simple_function(n=210, n_train=200, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    options = {"kernel": kernel, "landmarks": 40}
    torch.manual_seed(0)
    full = _trajectory_run(x, y, data=loader, **options)
    assert full is not None and full > 10
    torch.manual_seed(0)
    assert _trajectory_run(x, y, split=full // 2, data=loader, **options) == full
    # A subset drawn by max_samples is found again too, whatever order the rows come in.
    torch.manual_seed(0)
    sub = _trajectory_run(x, y, data=loader, max_samples=120, **options)
    torch.manual_seed(0)
    assert _trajectory_run(x, y, split=sub // 2, data=loader, max_samples=120, **options) == sub


def test_a_resume_on_other_data_is_refused_naming_the_missing_rows():
    model, opt, stopper, x, y = _setup(seed=1)
    stopper.start()
    state = stopper.state_dict()
    resumed = REMLStopper(model, (x[:150], y[:150]), optimizer=opt, criterion="reml")
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="50 of the 200 rows the saved decision .* given at"):
        resumed.resume()
    # As many rows with other values, as a dataset that augments at random gives: said, and
    # the rows are read as they come.
    noisy = y + 1e-3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    resumed = REMLStopper(model, (x, noisy), optimizer=opt, criterion="reml")
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="200 of the 200 rows .* augments at random"):
        resumed.resume()
    assert torch.equal(resumed.data[1], noisy)
    old = dict(state, baseline={k: v for k, v in state["baseline"].items() if k != "rows"})
    resumed = REMLStopper(model, (x, y), optimizer=opt, loss="half_mse", criterion="reml")
    resumed.load_state_dict(old)  # a checkpoint saved before the rows were kept
    assert resumed.resume().fit.t == stopper.decision.fit.t


class Linearised(nn.Module):
    """f_lin(x; theta) = f(x; theta0) + J0 (theta - theta0): the lazy-training limit."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.theta0 = {k: v.detach().clone() for k, v in net.named_parameters()}
        self.delta = nn.ParameterDict(
            {k.replace(".", "_"): nn.Parameter(torch.zeros_like(v)) for k, v in self.theta0.items()}
        )
        for p in net.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        names = list(self.theta0)

        def f(*params):
            return torch.func.functional_call(self.net, dict(zip(names, params)), (x,))

        tangents = tuple(self.delta[k.replace(".", "_")] for k in names)
        out, jv = torch.func.jvp(f, tuple(self.theta0[k] for k in names), tangents)
        return out + jv


def test_trajectory_rule_on_a_linearised_network_matches_the_spectrum():
    """On f_lin trained by full-batch GD, the real residual is (I - lr H)^k u0 exactly (M2), so
    the trajectory rule must stop where D_k = sum_j (lambda_j - lambda-bar) z_j^2 (1 - lr
    lambda_j)^k first turns <= 0; at lr * lambda_max = 0.015 the continuous clock of the time
    rule stops within one step of it."""
    x, y, _, _ = paper_simple_function(n=150, n_train=100, seed=4)
    x, y = x.double(), y.double()
    lr = 0.005
    model = Linearised(paper_mlp(width=64, seed=4).double())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    stopper = REMLStopper(model, x, y, optimizer=opt, rule="trajectory")
    decision = stopper.start()
    lam = torch.from_numpy(stopper.spectrum.eigenvalues)
    z2 = torch.from_numpy(stopper.spectrum.z) ** 2
    k_discrete = next(
        k
        for k in range(1, 5000)
        if float(((lam - lam.mean()) * z2 * (1 - lr * lam) ** k).sum()) <= 0
    )
    stop = _run(model, opt, stopper, x, y)
    assert stop is not None and stop > 10
    assert abs(stop - k_discrete) <= 1
    assert lr * float(lam.max()) < 0.02
    time_rule_stop = math.ceil(decision.fit.t / lr - 0.5)
    assert abs(time_rule_stop - stop) <= 1


def test_stopper_does_not_disturb_training():
    """Parameters, optimizer state and RNG identical with and without the stopper."""

    def train(with_stopper: bool, steps: int = 30):
        model, opt, stopper, x, y = _setup(seed=2, rule="trajectory")
        model.train()
        drop = nn.Dropout(0.1)
        torch.manual_seed(123)
        if with_stopper:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stopper.start()
        for _ in range(steps):
            opt.zero_grad()
            loss = 0.5 * ((drop(model(x)) - y) ** 2).mean()
            loss.backward()
            opt.step()
            if with_stopper:
                stopper.step()
        return model.state_dict(), opt.state_dict(), torch.rand(3), model.training

    a, b = train(False), train(True)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1] or str(a[1]) == str(b[1])
    assert torch.equal(a[2], b[2]) and a[3] == b[3]


def test_refresh_records_drift_and_warns_past_the_threshold():
    model, opt, stopper, x, y = _setup(refresh_every_n_steps=10, drift_threshold=1e-9)
    stopper.start()
    with pytest.warns(RuntimeWarning, match="drifted"):
        for _ in range(10):
            _gd_step(model, opt, x, y)
            stopper.step()
    refresh = [c for c in stopper.history if c.drift is not None]
    assert len(refresh) == 1 and refresh[0].step == 10
    assert 0 < refresh[0].drift < 1 and refresh[0].t_hat > 0
    assert stopper.t_target == refresh[0].t_hat


def test_kernel_drift_in_row_blocks_is_the_relative_frobenius_change():
    from remlstop.stopper import _kernel_drift

    g = torch.Generator().manual_seed(0)
    H0 = torch.randn(37, 37, generator=g, dtype=torch.float64)
    H = H0 + 0.1 * torch.randn(37, 37, generator=g, dtype=torch.float64)
    expected = float(torch.linalg.norm(H - H0) / torch.linalg.norm(H0))
    for rows in (1, 5, 37, 1024):
        assert _kernel_drift(H, H0, rows=rows) == pytest.approx(expected, rel=1e-12)


def test_dataloader_and_max_samples():
    x, y, _, _ = paper_simple_function(n=300, n_train=240)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True
    )
    model = paper_mlp(width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state = torch.random.get_rng_state()
    stopper = REMLStopper(model, loader, optimizer=opt, max_samples=100)
    decision = stopper.start()
    assert decision.n_rows == 100
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_shuffled_loader_that_drops_rows_gives_the_decision_on_every_row():
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    x, y, _, _ = paper_simple_function(n=250, n_train=200, seed=0)
    data = TensorDataset(x, y)
    loaders = {
        "drop_last": DataLoader(data, batch_size=32, shuffle=True, drop_last=True),
        "num_samples": DataLoader(data, batch_size=32, sampler=RandomSampler(data, num_samples=64)),
        "replacement": DataLoader(data, batch_size=50, sampler=RandomSampler(data, True)),
    }
    decisions = {}
    for name, data_ in [("tensors", (x, y)), *loaders.items()]:
        model = paper_mlp(width=32, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decisions[name] = REMLStopper(model, data_, optimizer=opt, criterion="reml").start()
    for name in loaders:
        assert decisions[name].n_rows == 200, name
        assert decisions[name].fit.t == pytest.approx(decisions["tensors"].fit.t, rel=1e-9), name
    # A fixed order drops the same rows every epoch: those are not trained on.
    model = paper_mlp(width=32, seed=0)
    fixed = DataLoader(data, batch_size=32, drop_last=True)
    stopper = REMLStopper(model, fixed, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert stopper.start().n_rows == 192


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"check_every_n_steps": 0}, ValueError, "check_every_n_steps"),
        ({"rule": "patience"}, ValueError, "rule"),
        ({"on_insignificant": "ignore"}, ValueError, "on_insignificant"),
        ({"loss": "cross_entropy"}, ValueError, "one-hot"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"test_covariates": "y"}, ValueError, "test_covariates"),
        ({"test_covariates": ["f0", "f0"]}, ValueError, "test_covariates"),
        ({"test_covariates": 3}, ValueError, "test_covariates"),
        ({"alpha": "0.05"}, ValueError, "alpha must be a real number"),
        ({"seed": 1.5}, ValueError, "seed must be an integer"),
        ({"drift_threshold": float("nan")}, ValueError, "drift_threshold"),
        ({"drift_threshold": -1.0}, ValueError, "drift_threshold"),
        ({"check_every_n_steps": float("inf")}, ValueError, "check_every_n_steps"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"track_residual": "yes"}, ValueError, "track_residual"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    x, y, _, _ = paper_simple_function(n=60, n_train=50)
    model = paper_mlp(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(error, match=match):
        REMLStopper(model, x, y, optimizer=opt, **kwargs)


def test_bad_data_is_refused_at_start():
    x, y, _, _ = paper_simple_function(n=60, n_train=50)
    model = paper_mlp(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="shape"):
        REMLStopper(model, x, torch.randn(50, 2), optimizer=opt).start()
    with pytest.raises(TypeError, match="class labels"):
        REMLStopper(model, x, torch.randint(0, 2, (50,)), optimizer=opt).start()
    with pytest.raises(ValueError, match="no batches"):
        empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]))
        REMLStopper(model, empty, optimizer=opt).start()
    nan_model = paper_mlp(width=8)
    with torch.no_grad():
        nan_model[0].bias.fill_(math.nan)
    nan_opt = torch.optim.SGD(nan_model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="NaN"):
        REMLStopper(nan_model, x, y, optimizer=nan_opt).start()
    with pytest.raises(RuntimeError, match="start"):
        REMLStopper(model, x, y, optimizer=opt).step()


def _initial_residual(model, x, y):
    with torch.no_grad():
        f0 = model(x)
    return f0, (y.double() - f0.double()).reshape(-1)


def test_test_covariates_f0_projects_the_initial_output_off_in_the_test_only():
    model, opt, stopper, x, y = _setup(seed=2, test_covariates="f0")
    decision = stopper.start()
    f0, u0 = _initial_residual(model, x, y)
    direct = variance_component_test(empirical_ntk(model, x), u0, covariates=f0)
    assert decision.test.n_fixed == 1
    assert decision.test.pvalue == pytest.approx(direct.pvalue, rel=1e-9)
    assert decision.test.statistic == pytest.approx(direct.statistic, rel=1e-12)
    assert "1 fixed effect(s) projected off" in str(decision)
    plain = _setup(seed=2)[2].start()
    assert decision.fit.t == pytest.approx(plain.fit.t, rel=1e-12)  # t-hat is unchanged
    assert decision.test.statistic != pytest.approx(plain.test.statistic, rel=1e-6)


def test_test_covariates_f0_keeps_the_size_on_targets_independent_of_x():
    # An output layer scaled up makes the random f0 large: the plain test then rejects on pure
    # noise targets (its H0 is "y - f0 is noise"), the test with f0 projected off does not.
    draws = 200
    rejections = {None: 0, "f0": 0}
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(80, 10, generator=g), torch.randn(80, 1, generator=g)
        model = paper_mlp(width=32, seed=seed)
        with torch.no_grad():
            model[-1].weight.mul_(3.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for cov in rejections:
            decision = REMLStopper(model, x, y, optimizer=opt, test_covariates=cov).start()
            rejections[cov] += decision.test.train
    assert rejections[None] / draws > 0.25
    assert 0.02 <= rejections["f0"] / draws <= 0.09  # alpha = 0.05, binomial SE 0.015


def test_test_covariates_intercept_is_one_column_per_output():
    x, _, _, _ = paper_simple_function(n=90, n_train=60, seed=4)
    y = torch.randn(60, 2, generator=torch.Generator().manual_seed(4))
    model = paper_mlp(width=16, d_out=2, seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    decision = REMLStopper(model, x, y, optimizer=opt, test_covariates="intercept").start()
    _, u0 = _initial_residual(model, x, y)
    H = empirical_ntk(model, x)
    direct = variance_component_test(H, u0, covariates=torch.ones(60, 1))
    assert decision.test.n_fixed == 2
    assert decision.test.pvalue == pytest.approx(direct.pvalue, rel=1e-9)
    both = REMLStopper(model, x, y, optimizer=opt, test_covariates=("f0", "intercept")).start()
    assert both.test.n_fixed == 3


def test_test_covariates_f0_of_a_zero_output_network_adds_no_column():
    model, opt, stopper, x, y = _setup(seed=5, test_covariates="f0")
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    decision = stopper.start()
    assert decision.test.n_fixed == 0
    plain = REMLStopper(model, x, y, optimizer=opt).start()
    assert decision.test.pvalue == plain.test.pvalue


def test_test_covariates_survive_a_resume():
    model, opt, stopper, x, y = _setup(seed=6, test_covariates="f0")
    decision = stopper.start()
    state = stopper.state_dict()
    resumed = REMLStopper(model, x, y, optimizer=opt, criterion="reml", test_covariates="f0")
    resumed.load_state_dict(state)
    again = resumed.start()
    assert again.test.n_fixed == 1
    assert again.test.pvalue == pytest.approx(decision.test.pvalue, rel=1e-12)


def test_a_nystrom_decision_survives_a_resume_with_its_cluster_as_one_entry():
    model, opt, stopper, x, y = _setup(seed=7, criterion="reml-linear", kernel="nystrom")
    decision = stopper.start()
    spectrum = decision.fit.spectrum
    approx = spectrum.approximation
    assert spectrum.multiplicity is not None and spectrum.eigenvalues.size == approx.rank + 1
    assert spectrum.multiplicity.max() == approx.tail_count and spectrum.dim == 200
    buf = __import__("io").BytesIO()
    torch.save(stopper.state_dict(), buf)
    buf.seek(0)
    resumed = REMLStopper(model, x, y, optimizer=opt, criterion="reml-linear", kernel="nystrom")
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    again = resumed.start()
    np.testing.assert_array_equal(again.fit.spectrum.multiplicity, spectrum.multiplicity)
    assert again.fit.t == pytest.approx(decision.fit.t, rel=1e-12)
    assert again.test.pvalue == pytest.approx(decision.test.pvalue, rel=1e-12)


def test_integer_inputs_of_an_embedding_network_get_the_layerwise_kernel():
    torch.manual_seed(0)
    X = torch.randint(0, 12, (80, 2))
    Y = torch.randn(12)[X].sum(1, keepdim=True) + 0.3 * torch.randn(80, 1)
    model = nn.Sequential(
        nn.Embedding(12, 4), nn.Flatten(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)
    )
    stopper = REMLStopper(model, X, Y, optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    decision = stopper.start()
    assert decision.kernel_path == "layerwise"
    assert decision.train and math.isfinite(decision.fit.t) and decision.fit.t > 0
    assert math.isfinite(decision.target_steps) and decision.target_steps > 0
