"""End-to-end tests of the Lightning callbacks (METHOD M2, M4, M5).

Most run ``remlstop.pytorch_lightning`` with a ``pytorch_lightning.Trainer``; the import-path
tests run ``remlstop.lightning`` with ``lightning.pytorch``.

Small ReLU MLPs (10 -> 64 -> 64 -> 1) on the paper's simple-function data, SGD, half-MSE
``0.5 * mean((f - y)**2)``: the REML target is a few dozen to a few hundred steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

from remlstop.datasets import paper_simple_function  # noqa: E402
from remlstop.pytorch_lightning import REMLEarlyStopping  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 200
A = 0.5  # half-MSE: dt = 2 a lr per step (M2)
# The callback's mechanics are checked against the paper's t-hat (decision.fit), so these
# tests pin its criterion whatever the default is.
PAPER = {"criterion": "reml"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: intra-op threads only contend (and slow Lightning's loop by 10x on 2 cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*litlogger.*")
        yield


def _data(n_train: int = N_TRAIN, noise: bool = False):
    x, y, _, _ = paper_simple_function(n=n_train + 50, n_train=n_train, seed=0)
    if noise:  # targets independent of the inputs: nothing to learn
        y = torch.randn(n_train, 1, generator=torch.Generator().manual_seed(3))
    return x, y


def _module_class(pkg):
    class Regressor(pkg.LightningModule):
        def __init__(
            self,
            lr=0.05,
            momentum=0.0,
            optimizer="sgd",
            schedule=None,
            loss="half_mse",
            n_optimizers=1,
            skip_odd_batches=False,
        ):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
            )
            self.lr, self.momentum, self.opt, self.schedule = lr, momentum, optimizer, schedule
            self.loss_name, self.n_optimizers = loss, n_optimizers
            self.skip_odd_batches = skip_odd_batches
            if n_optimizers > 1:
                self.automatic_optimization = False

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if self.skip_odd_batches and batch_idx % 2 == 1:
                return None  # Lightning: skip this batch
            x, y = batch
            r = self(x) - y
            loss = 0.5 * (r**2).sum() if self.loss_name == "half_sum" else 0.5 * (r**2).mean()
            if not self.automatic_optimization:
                opts = self.optimizers()
                for opt in opts:
                    opt.zero_grad()
                self.manual_backward(loss)
                for opt in opts:
                    opt.step()
            return loss

        def configure_optimizers(self):
            if self.opt == "adam":
                return torch.optim.Adam(self.parameters(), lr=self.lr)
            if self.n_optimizers > 1:
                return [
                    torch.optim.SGD(self.net[:2].parameters(), lr=self.lr),
                    torch.optim.SGD(self.net[2:].parameters(), lr=self.lr),
                ]
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
            if self.schedule is None:
                return opt
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regressor


Regressor = _module_class(pl)


def _trainer(callbacks, pkg=pl, **kw):
    kw.setdefault("max_epochs", 5000)
    kw.setdefault("accelerator", "cpu")
    return pkg.Trainer(
        callbacks=callbacks,
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _loader(x, y, batch_size=N_TRAIN, shuffle=False):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, num_workers=0)


def _expected_stop(t_hat: float, dts) -> int:
    """First step k with t_k + dt_k / 2 >= t-hat, t_k the summed Δt (M2 time rule)."""
    t = 0.0
    for k, dt in enumerate(dts, start=1):
        t += dt
        if t + 0.5 * dt >= t_hat:
            return k
    raise AssertionError("no stop within the schedule")


def _fit(
    lr=0.05,
    batch_size=N_TRAIN,
    cb_kwargs=None,
    trainer_kwargs=None,
    module_kwargs=None,
    data=None,
    shuffle=False,
):
    x, y = _data() if data is None else data
    cb = REMLEarlyStopping(**{**PAPER, **(cb_kwargs or {})})
    model = Regressor(lr=lr, **(module_kwargs or {}))
    trainer = _trainer([cb], **(trainer_kwargs or {}))
    trainer.fit(model, _loader(x, y, batch_size, shuffle))
    return trainer, cb, model


# ------------------------------------------------------------------------- time rule
def test_stops_exactly_at_target_step_full_batch():
    trainer, cb, _ = _fit(lr=0.05)
    d = cb.decision
    assert d is not None and d.train and d.rule == "time"
    dt = 2 * A * 0.05
    assert d.dt_per_step == pytest.approx(dt)
    expected = round(d.fit.t / dt)
    assert 20 <= expected <= 500
    assert trainer.global_step == expected == cb.stopper.stop_step == cb.stopped_step
    assert trainer.should_stop and cb.stopping_reason_message.startswith("REMLEarlyStopping")
    assert trainer.current_epoch == cb.stopped_epoch + 1  # full batch: one step per epoch
    # history, decision and metrics are reachable from the callback
    assert len(cb.history) == expected and cb.history[-1].step == expected
    for name in ("pvalue", "t_hat", "target_steps", "df", "t"):
        assert f"remlstop/{name}" in trainer.callback_metrics
    assert float(trainer.callback_metrics["remlstop/t_hat"]) == pytest.approx(d.fit.t, rel=1e-6)
    assert cb.metrics["remlstop/t"] == pytest.approx(expected * dt)


def test_stops_mid_epoch_with_mini_batches(caplog):
    batch_size = 32  # 200 rows: 7 batches per epoch
    with caplog.at_level(logging.INFO):
        trainer, cb, _ = _fit(lr=0.05, batch_size=batch_size, cb_kwargs={"verbose": True})
    assert "remlstop decision: TRAIN" in caplog.text  # verbose: the decision and the stop
    assert "Signaling Trainer to stop" in caplog.text
    expected = round(cb.decision.fit.t / (2 * A * 0.05))
    batches_per_epoch = math.ceil(N_TRAIN / batch_size)
    assert expected % batches_per_epoch != 0, "pick data so that the target falls mid-epoch"
    assert trainer.global_step == expected
    assert cb.stopped_epoch == expected // batches_per_epoch  # the epoch the stop fell in
    assert trainer.current_epoch == cb.stopped_epoch + 1  # Lightning closes the cut epoch


@pytest.mark.parametrize("accumulate", [2, 3])
def test_gradient_accumulation_counts_the_epochs_last_step_as_its_share(accumulate):
    # 7 batches of 32 rows per epoch: Lightning divides each loss by accumulate_grad_batches,
    # so the epoch's last step, over the 1 batch left over, moves 1/accumulate of a full one.
    trainer, cb, _ = _fit(
        lr=0.05, batch_size=32, trainer_kwargs={"accumulate_grad_batches": accumulate}
    )
    dt = 2 * A * 0.05
    steps_per_epoch = math.ceil(7 / accumulate)
    dts = [dt / accumulate if k % steps_per_epoch == 0 else dt for k in range(1, 10_000)]
    expected = _expected_stop(cb.decision.fit.t, dts)
    assert expected > round(cb.decision.fit.t / dt)  # the short steps matter
    assert trainer.global_step == expected == cb.stopper.clock.steps
    assert cb.metrics["remlstop/t"] == pytest.approx(sum(dts[:expected]))


@pytest.mark.filterwarnings("ignore:LBFGS has no fixed map")
def test_lbfgs_counts_one_step_per_optimizer_step_not_per_closure_call():
    class LBFGSRegressor(Regressor):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.01, max_iter=4)

    x, y = _data()
    cb = REMLEarlyStopping(**PAPER, check_every_n_steps=1)
    trainer = _trainer([cb], max_steps=3)
    trainer.fit(LBFGSRegressor(), _loader(x, y))
    assert trainer.global_step == 3 == cb.stopper.clock.steps
    assert [c.step for c in cb.history] == [1, 2, 3]


def test_steps_a_gradient_scaler_skips_add_no_time():
    from pytorch_lightning.plugins.precision import MixedPrecision

    calls = []

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            calls.append(1)
            return super().step(closure)

    class ScaledRegressor(Regressor):
        def configure_optimizers(self):
            return CountingSGD(self.parameters(), lr=self.lr)

    # A scale so large that float16 gradients overflow on some steps, which the scaler skips.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=100_000)
    x, y = _data()
    cb = REMLEarlyStopping(**PAPER)
    trainer = _trainer([cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(ScaledRegressor(lr=0.05), _loader(x, y))
    dt = 2 * A * 0.05
    assert len(calls) < trainer.global_step  # the scaler skipped some steps
    assert cb.stopper.clock.t == pytest.approx(len(calls) * dt)
    assert len(calls) == round(cb.decision.fit.t / dt)


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_batches_skipped_by_training_step_returning_none_add_no_time():
    batch_size = 32  # 7 batches per epoch; batches 1, 3, 5 return None and update nothing
    trainer, cb, _ = _fit(lr=0.05, batch_size=batch_size, module_kwargs={"skip_odd_batches": True})
    dt = 2 * A * 0.05
    dts = [0.0 if (k % 7) % 2 else dt for k in range(10_000)]
    expected = _expected_stop(cb.decision.fit.t, dts)
    assert expected > round(cb.decision.fit.t / dt) + 10  # the skipped steps would matter
    assert trainer.global_step == expected == cb.stopper.stop_step
    assert cb.metrics["remlstop/t"] == pytest.approx(sum(dts[:expected]))


def test_sum_reduced_loss_scales_time_by_batch_rows():
    batch_size = 40  # equal batches: dt = 2 a lr B per step (M2, sum reduction)
    lr = 0.05 / batch_size
    trainer, cb, _ = _fit(
        lr=lr,
        batch_size=batch_size,
        cb_kwargs={"loss": "half_sum"},
        module_kwargs={"loss": "half_sum"},
    )
    dt = 2 * A * lr * batch_size
    assert trainer.global_step == round(cb.decision.fit.t / dt)


def test_trajectory_rule_stops_where_D_turns_non_positive():
    trainer, cb, _ = _fit(lr=0.05, cb_kwargs={"rule": "trajectory"})
    D = [c.D for c in cb.history]
    assert trainer.global_step == cb.stopper.stop_step == len(D)
    assert D[-1] <= 0 < min(D[:-1])
    assert "remlstop/D" in trainer.callback_metrics
    assert cb.metrics["remlstop/D"] == D[-1]


def test_callback_reused_for_a_second_fit_starts_afresh():
    x, y = _data()
    cb = REMLEarlyStopping(**PAPER)
    first = _trainer([cb])
    first.fit(Regressor(lr=0.05), _loader(x, y))
    second = _trainer([cb])
    second.fit(Regressor(lr=0.025), _loader(x, y))
    assert first.global_step == round(cb.decision.fit.t / (2 * A * 0.05))
    assert second.global_step == round(cb.decision.fit.t / (2 * A * 0.025)) == cb.stopped_step


def test_a_second_fit_of_the_same_network_continues_its_decision():
    x, y = _data()
    cb = REMLEarlyStopping(**PAPER)
    model = Regressor(lr=0.05, momentum=0.5)
    _trainer([cb], max_steps=30).fit(model, _loader(x, y))
    first = cb.decision
    second = _trainer([cb])
    second.fit(model, _loader(x, y))  # configure_optimizers makes a fresh optimizer
    uninterrupted = REMLEarlyStopping(**PAPER)
    alone = _trainer([uninterrupted])
    alone.fit(Regressor(lr=0.05, momentum=0.5), _loader(x, y))
    assert cb.decision.fit.t == first.fit.t  # the decision made at the network's start
    # The fresh optimizer's momentum buffer starts again, so the rest of the run is a little
    # slower than the uninterrupted one: a step or two more, never fewer.
    total = 30 + second.global_step
    assert alone.global_step <= total <= alone.global_step + 2
    with pytest.raises(ValueError, match="earlier fit; for a new decision on other data"):
        _trainer([cb]).fit(model, _loader(x[:150], y[:150]))
    # The same network re-initialised is a new start: a new decision.
    model.net[0].reset_parameters()
    _trainer([cb], max_steps=1).fit(model, _loader(x, y))
    assert cb.decision is not first and cb.stopper.clock.steps == 1


def test_refresh_re_estimates_t_hat_and_still_stops_on_the_clock():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # drift warnings: a width-64 net moves
        trainer, cb, _ = _fit(lr=0.05, cb_kwargs={"refresh_every_n_steps": 20})
    refreshes = [c for c in cb.history if c.drift is not None]
    assert refreshes and all(c.step % 20 == 0 for c in refreshes)
    assert cb.metrics["remlstop/t_hat"] == cb.stopper.t_target == refreshes[-1].t_hat
    dt = 2 * A * 0.05
    k = trainer.global_step
    assert k == cb.stopper.stop_step and (k - 0.5) * dt <= cb.stopper.t_target + 1e-12


# --------------------------------------------------------------------- import paths
def test_lightning_pytorch_import_path_gives_the_same_stop():
    L = pytest.importorskip("lightning.pytorch")
    from remlstop.lightning import REMLEarlyStopping as LightningREMLEarlyStopping

    # Each is its own package's plain Callback, not an EarlyStopping with its monitoring off.
    assert issubclass(LightningREMLEarlyStopping, L.Callback)
    assert not issubclass(LightningREMLEarlyStopping, L.callbacks.EarlyStopping)
    assert issubclass(REMLEarlyStopping, pl.Callback)
    assert not issubclass(REMLEarlyStopping, pl.callbacks.EarlyStopping)
    x, y = _data()
    cb = LightningREMLEarlyStopping(**PAPER)
    trainer = _trainer([cb], pkg=L)
    trainer.fit(_module_class(L)(lr=0.05), _loader(x, y))
    assert trainer.global_step == round(cb.decision.fit.t / (2 * A * 0.05))


def test_mismatched_trainer_is_refused():
    L = pytest.importorskip("lightning.pytorch")
    from remlstop.lightning import REMLEarlyStopping as LightningREMLEarlyStopping

    x, y = _data()
    with pytest.raises(TypeError, match=r"from remlstop\.pytorch_lightning import"):
        _trainer([LightningREMLEarlyStopping(**PAPER)], max_steps=2).fit(Regressor(), _loader(x, y))
    with pytest.raises(TypeError, match=r"from remlstop\.lightning import"):
        _trainer([REMLEarlyStopping(**PAPER)], pkg=L, max_steps=2).fit(
            _module_class(L)(), _loader(x, y)
        )


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("how", ["max_steps", "model_checkpoint"])
def test_resume_from_checkpoint_stops_on_the_same_step(tmp_path, how):
    x, y = _data()
    if how == "max_steps":  # a first run cut short, saved after fit
        full, cb_full, _ = _fit(lr=0.05)
        stop = full.global_step
        first = _trainer([REMLEarlyStopping(**PAPER)], max_steps=stop // 2)
        first.fit(Regressor(lr=0.05), _loader(x, y))
        assert first.global_step == stop // 2 and not first.callbacks[0].stopper.should_stop
        ckpt, saved_step = tmp_path / "half.ckpt", stop // 2
        first.save_checkpoint(ckpt)
    else:  # ModelCheckpoint inside the uninterrupted run (it runs after our hooks)
        cb_full = REMLEarlyStopping(**PAPER)
        ckpt_cb = pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path, every_n_train_steps=20, save_top_k=-1, filename="{step}"
        )
        full = pl.Trainer(
            callbacks=[cb_full, ckpt_cb],
            max_epochs=5000,
            enable_progress_bar=False,
            logger=False,
            enable_model_summary=False,
        )
        full.fit(Regressor(lr=0.05), _loader(x, y))
        stop = full.global_step
        ckpt, saved_step = tmp_path / "step=40.ckpt", 40
        assert stop > saved_step and ckpt.exists()
    state = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    (key,) = [k for k in state["callbacks"] if k.startswith("REMLEarlyStopping")]
    assert state["callbacks"][key]["stopper"]["clock"]["steps"] == saved_step

    cb = REMLEarlyStopping(**PAPER)
    resumed = _trainer([cb])
    resumed.fit(Regressor(lr=0.05), _loader(x, y), ckpt_path=ckpt, weights_only=True)
    assert resumed.global_step == stop == cb.stopper.stop_step == cb_full.stopper.stop_step
    assert cb.decision.fit.t == pytest.approx(cb_full.decision.fit.t, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_a_non_default_criterion_survives_a_checkpoint(tmp_path):
    x, y = _data()
    opts = {"criterion": "gcv"}
    full, cb_full, _ = _fit(lr=0.05, cb_kwargs=opts)
    stop = full.global_step
    assert cb_full.decision.criterion == "gcv" and 1 < stop < 5000
    first = _trainer([REMLEarlyStopping(**opts)], max_steps=stop // 2)
    first.fit(Regressor(lr=0.05), _loader(x, y))
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    cb = REMLEarlyStopping(**opts)
    _trainer([cb]).fit(Regressor(lr=0.05), _loader(x, y), ckpt_path=ckpt, weights_only=True)
    assert cb.stopper.stop_step == stop and cb.decision.criterion == "gcv"
    assert cb.decision.t_target == pytest.approx(cb_full.decision.t_target, rel=1e-12)
    with pytest.raises(ValueError, match="criterion='gcv'"):
        _trainer([REMLEarlyStopping(**PAPER)]).fit(
            Regressor(lr=0.05), _loader(x, y), ckpt_path=ckpt, weights_only=True
        )


def test_the_nystrom_path_runs_in_the_trainer_and_survives_a_checkpoint(tmp_path):
    x, y = _data()
    opts = {"kernel": "nystrom", "landmarks": 60}
    full, cb_full, _ = _fit(lr=0.05, cb_kwargs=opts)
    stop = full.global_step
    approx = cb_full.decision.approximation
    assert approx is not None and approx.landmarks == 60 and approx.tail_count == N_TRAIN - 60
    assert stop == round(cb_full.decision.fit.t / (2 * A * 0.05))
    first = _trainer([REMLEarlyStopping(**PAPER, **opts)], max_steps=stop // 2)
    first.fit(Regressor(lr=0.05), _loader(x, y))
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    cb = REMLEarlyStopping(**PAPER, **opts)
    _trainer([cb]).fit(Regressor(lr=0.05), _loader(x, y), ckpt_path=ckpt, weights_only=True)
    assert cb.stopper.stop_step == stop
    assert cb.decision.approximation == approx


# ------------------------------------------------------------------------------ DDP
def test_ddp_two_processes_stop_on_the_same_step_as_one(tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    results = {}
    n_train = 201  # odd: the DistributedSampler pads one row, which must be counted once
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        out.mkdir()
        if devices == 1:  # in-process: the same script's code path, without a process start
            from tests import _ddp_script

            _ddp_script.run(str(out), 1, n_train)
        else:
            proc = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "tests" / "_ddp_script.py"),
                    str(out),
                    str(devices),
                    str(n_train),
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
        results[devices] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    (single,) = results[1]
    ranks = results[2]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    for r in ranks:
        assert r["n_rows"] == n_train
        assert r["data_digest"] == single["data_digest"]  # the gathered data, in order
        assert r["t_hat"] == single["t_hat"]
        assert r["global_step"] == r["stop_step"] == single["global_step"]
    assert single["global_step"] == round(single["t_hat"] / single["dt"])


# ------------------------------------------------------------------- clock variants
def test_step_interval_lr_scheduler_changes_the_stop_as_the_clock_says():
    lr, drop_at = 0.05, 20

    def schedule(k):  # LambdaLR: the lr of step k + 1 is lr * schedule(k)
        return 1.0 if k < drop_at else 0.25

    trainer, cb, _ = _fit(lr=lr, module_kwargs={"schedule": schedule})
    t_hat = cb.decision.fit.t
    expected = _expected_stop(t_hat, [2 * A * lr * schedule(k) for k in range(100_000)])
    constant = _expected_stop(t_hat, [2 * A * lr] * 100_000)
    assert expected > constant + 10
    assert trainer.global_step == expected
    assert cb.stopper.clock.t == pytest.approx(
        sum(2 * A * lr * schedule(k) for k in range(expected))
    )


def test_sgd_momentum_counts_the_transient():
    lr, beta = 0.01, 0.8
    trainer, cb, _ = _fit(lr=lr, module_kwargs={"momentum": beta})
    assert cb.decision.dt_per_step == pytest.approx(2 * A * lr)  # step 1 moves like plain SGD
    k, t = 0, 0.0
    while True:  # heavy ball: step i advances 2 a lr (1 - beta^i)/(1 - beta) (M2)
        k += 1
        dt = 2 * A * lr * (1 - beta**k) / (1 - beta)
        t += dt
        if t + 0.5 * dt >= cb.decision.t_target:
            break
    assert trainer.global_step == k


def test_adam_warns_and_still_stops():
    with pytest.warns(RuntimeWarning, match="no fixed map"):
        trainer, cb, _ = _fit(
            lr=1e-3, module_kwargs={"optimizer": "adam"}, trainer_kwargs={"max_steps": 3000}
        )
    assert cb.stopper.should_stop and 0 < trainer.global_step < 3000
    assert trainer.global_step == cb.stopper.stop_step
    # the loss-matched clock (M2): the matched time at the stop reached t-hat, a step before not
    nominal_dt = 2 * A * 1e-3
    assert cb.history[-1].t + 0.5 * nominal_dt >= cb.decision.fit.t
    assert cb.history[-2].t + 0.5 * nominal_dt < cb.decision.fit.t
    assert cb.metrics["remlstop/t"] == cb.history[-1].t == cb.stopper.t  # not the nominal time
    assert cb.stopper.clock.t != cb.stopper.t


# ----------------------------------------------------------------- test and limits
def test_insignificant_test_stops_before_any_update():
    x, y = _data(noise=True)
    cb = REMLEarlyStopping(**PAPER, on_insignificant="stop")
    model = Regressor(lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer([cb])
    trainer.fit(model, _loader(x, y))
    assert not cb.decision.train and cb.decision.test.pvalue >= 0.05
    assert trainer.global_step == 0 and cb.stopper.stop_step == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "test finds no signal" in cb.stopping_reason_message
    assert cb.metrics["remlstop/pvalue"] == cb.decision.test.pvalue


def test_min_steps_delays_the_stop_to_exactly_min_steps():
    trainer, cb, _ = _fit(lr=0.05, trainer_kwargs={"min_steps": 120})
    target = round(cb.decision.fit.t / (2 * A * 0.05))
    assert target < 120
    assert cb.stopper.stop_step == target
    assert trainer.global_step == 120 == cb.stopped_step


def test_min_epochs_delays_the_stop_to_the_end_of_min_epochs():
    # 7 batches per epoch; 15 epochs = 105 steps > target
    trainer, cb, _ = _fit(lr=0.05, batch_size=32, trainer_kwargs={"min_epochs": 15})
    assert cb.stopper.stop_step < 105
    assert trainer.global_step == 105 and trainer.current_epoch == 15


def test_training_identical_with_and_without_the_callback():
    """Same seed: parameters and optimizer state match a plain run to the same step."""
    pl.seed_everything(7, workers=True)
    x, y = _data()
    with_cb, cb, model_cb = _fit(
        lr=0.05, batch_size=32, shuffle=True, module_kwargs={"momentum": 0.5}, data=(x, y)
    )
    stop = with_cb.global_step
    assert stop == cb.stopper.stop_step
    pl.seed_everything(7, workers=True)
    model = Regressor(lr=0.05, momentum=0.5)
    plain = _trainer([], max_steps=stop)
    plain.fit(model, _loader(x, y, 32, shuffle=True))
    assert plain.global_step == stop
    for (k, a), (k2, b) in zip(model_cb.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    sa, sb = with_cb.optimizers[0].state_dict(), plain.optimizers[0].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        assert torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])


# ----------------------------------------------------------------------------- misuse
@pytest.mark.parametrize("loss", ["cross_entropy", nn.CrossEntropyLoss(), "nll"])
def test_classification_loss_is_refused(loss):
    with pytest.raises(ValueError, match="squared-error"):
        REMLEarlyStopping(loss=loss)


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="rule"):
        REMLEarlyStopping(rule="patience")
    with pytest.raises(TypeError, match="data must be"):
        REMLEarlyStopping(data=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="test_covariates"):
        REMLEarlyStopping(test_covariates="bias")


def test_test_covariates_reach_the_stopper():
    _, cb, _ = _fit(lr=0.05, cb_kwargs={"test_covariates": "f0"})
    assert cb.decision.test.n_fixed == 1 and cb.stopper.stop_step is not None


def test_several_optimizers_are_refused():
    x, y = _data()
    with pytest.raises(ValueError, match="exactly one optimizer"):
        _trainer([REMLEarlyStopping(**PAPER)], max_steps=2).fit(
            Regressor(n_optimizers=2), _loader(x, y)
        )


@pytest.mark.filterwarnings("ignore:Total length of")
def test_empty_dataloader_is_an_error():
    x, y = _data()
    with pytest.raises(ValueError, match="no batches"):
        _trainer([REMLEarlyStopping(**PAPER)], max_steps=2).fit(Regressor(), _loader(x[:0], y[:0]))


def test_targets_of_the_wrong_shape_are_refused():
    x, y = _data()
    with pytest.raises(ValueError, match="targets have shape"):
        _trainer([REMLEarlyStopping(data=(x, y.repeat(1, 2)))], max_steps=2).fit(
            Regressor(), _loader(x, y)
        )
    with pytest.raises(TypeError, match="class labels"):
        _trainer([REMLEarlyStopping(data=(x, y.long()))], max_steps=2).fit(
            Regressor(), _loader(x, y)
        )


def test_custom_batches_need_batch_to_xy():
    x, y = _data()

    class DictModule(Regressor):
        def training_step(self, batch, batch_idx):
            return 0.5 * ((self(batch["features"]) - batch["label"]) ** 2).mean()

    rows = [{"features": a, "label": b} for a, b in zip(x, y)]
    loader = DataLoader(rows, batch_size=N_TRAIN, num_workers=0)
    with pytest.raises(TypeError, match="batch_to_xy"):
        _trainer([REMLEarlyStopping(**PAPER)], max_steps=2).fit(DictModule(), loader)
    cb = REMLEarlyStopping(**PAPER, batch_to_xy=lambda b: (b["features"], b["label"]), model="net")
    trainer = _trainer([cb])
    trainer.fit(DictModule(lr=0.05), loader)
    assert cb.decision.kernel_path == "layerwise"  # model="net": the plain Sequential
    assert trainer.global_step == round(cb.decision.fit.t / (2 * A * 0.05))


def test_import_errors_name_the_pip_command(monkeypatch):
    import importlib
    import pickle

    assert pickle.loads(pickle.dumps(REMLEarlyStopping(alpha=0.01))).__class__ is REMLEarlyStopping
    for module, pip in (
        ("lightning", "pip install lightning"),
        ("pytorch_lightning", "pip install pytorch-lightning"),
    ):
        package = "lightning.pytorch" if module == "lightning" else "pytorch_lightning"
        monkeypatch.setitem(sys.modules, package, None)
        monkeypatch.delitem(sys.modules, f"remlstop.{module}", raising=False)
        with pytest.raises(ImportError, match=pip):
            importlib.import_module(f"remlstop.{module}")
        monkeypatch.undo()


def test_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="criterion must be one of"):
        REMLEarlyStopping(criterion="aic")
    with pytest.raises(TypeError, match="StopperOptions"):
        REMLEarlyStopping(patience=10)
    assert "criterion='gcv'" in repr(REMLEarlyStopping(criterion="gcv"))


# --------------------------------------------------------------- clipping and limits
class _GradNorms(pl.Callback):
    """Records the total gradient norm before Lightning clips it."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(
            float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        )


def test_norm_clipping_is_counted_as_a_smaller_step():
    lr, clip = 0.05, 0.02
    x, y = _data()
    cb, norms = REMLEarlyStopping(**PAPER), _GradNorms()
    trainer = _trainer([norms, cb], gradient_clip_val=clip)
    trainer.fit(Regressor(lr=lr), _loader(x, y))
    assert min(norms.norms) > clip  # clipping was active on every step
    dts = [2 * A * lr * min(1.0, clip / (g + 1e-6)) for g in norms.norms]
    assert trainer.global_step == _expected_stop(cb.decision.t_target, dts)
    assert cb.stopper.clock.t == pytest.approx(sum(dts), rel=1e-9)
    unclipped, _, _ = _fit(lr=lr)
    assert trainer.global_step > unclipped.global_step


def test_value_clipping_warns():
    x, y = _data()
    with pytest.warns(RuntimeWarning, match="gradient_clip_algorithm='value'"):
        _trainer(
            [REMLEarlyStopping(**PAPER)],
            gradient_clip_val=0.01,
            gradient_clip_algorithm="value",
            max_steps=3,
        ).fit(Regressor(), _loader(x, y))


def test_limit_train_batches_uses_the_rows_trained_on():
    x, y = _data()
    cb = REMLEarlyStopping(**PAPER)
    _trainer([cb], limit_train_batches=2, max_steps=1).fit(Regressor(), _loader(x, y, 50))
    assert cb.decision.n_rows == 100  # 2 batches of 50 of the 200 rows, in a fixed order
    with pytest.warns(RuntimeWarning, match="the loader shuffles"):
        cb = REMLEarlyStopping(**PAPER)
        _trainer([cb], limit_train_batches=2, max_steps=1).fit(
            Regressor(), _loader(x, y, 50, shuffle=True)
        )
    assert cb.decision.n_rows == 200


def test_a_shuffled_loader_that_drops_its_last_batch_gives_the_decision_on_every_row():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True)
    cb = REMLEarlyStopping(**PAPER)
    _trainer([cb], max_steps=1).fit(Regressor(), loader)
    full = REMLEarlyStopping(**PAPER)
    _trainer([full], max_steps=1).fit(Regressor(), _loader(x, y))
    assert cb.decision.n_rows == 200
    assert cb.decision.fit.t == pytest.approx(full.decision.fit.t, rel=1e-9)


def test_the_batches_trained_on_are_taken_without_touching_the_global_rng():
    from types import SimpleNamespace

    from remlstop._trainer_data import _trained_batches

    x, y = _data()
    before = torch.get_rng_state()
    batches = _trained_batches(SimpleNamespace(num_training_batches=2), _loader(x, y, 50))
    assert len(batches) == 2
    assert torch.equal(torch.get_rng_state(), before)
