"""Every kernel path and the stopper on each available device give the CPU float64 answer.

Parametrised over the devices this machine has (CPU always; CUDA when present), so a GPU
machine runs the same facts on its card. The statistics run in float64 whatever the device.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from remlstop import REMLStopper
from remlstop.datasets import paper_mlp, paper_simple_function
from remlstop.ntk import empirical_ntk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(n=120):
    x, y, _, _ = paper_simple_function(n=n + 10, n_train=n, seed=0)
    return x, y


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 2, 5)),
        nn.Conv2d(1, 3, kernel_size=(2, 3), padding=1),
        nn.BatchNorm2d(3),  # eval mode: a per-channel affine map with parameters
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 5, 1),
    ).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_the_kernel_on_each_device_matches_the_cpu_float64_kernel(device, network):
    x, _ = _data()
    model = paper_mlp(width=32, seed=0) if network == "mlp" else _cnn()
    reference = empirical_ntk(model.double(), x.double())
    on_device, info = empirical_ntk(model.to(device), x.to(device), return_info=True)
    assert info.path == ("layerwise" if network == "mlp" else "generic")
    assert on_device.dtype == torch.float64 and on_device.device.type == device
    torch.testing.assert_close(on_device.cpu(), reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["dense", "nystrom"])
def test_the_decision_on_each_device_is_the_cpu_decision(device, kernel):
    x, y = _data(300)
    decisions = []
    for where in ("cpu", device):
        model = paper_mlp(width=32, seed=0).double().to(where)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        data = (x.double().to(where), y.double().to(where))
        stopper = REMLStopper(model, data, optimizer=opt, kernel=kernel, landmarks=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decisions.append(stopper.start())
    cpu, dev = decisions
    assert dev.train == cpu.train
    assert dev.target_steps == pytest.approx(cpu.target_steps, rel=1e-6)
    for name, fit in cpu.criteria.fits.items():
        assert dev.criteria.fits[name].t == pytest.approx(fit.t, rel=1e-6), name


@pytest.mark.parametrize("device", DEVICES)
def test_the_lightning_callback_on_each_device_stops_where_it_does_on_the_cpu(device):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("pytorch_lightning")  # test_lightning's helpers import it
    from torch.utils.data import DataLoader, TensorDataset

    from remlstop.lightning import REMLEarlyStopping

    from .test_lightning import _module_class, _trainer

    Regressor = _module_class(pl)
    x, y = _data(200)
    loader = DataLoader(TensorDataset(x.double(), y.double()), batch_size=200, shuffle=False)
    runs = []
    for where in ("cpu", device):
        callback = REMLEarlyStopping(loss="half_mse")
        module = Regressor().double()
        trainer = _trainer([callback], pkg=pl, accelerator="gpu" if where == "cuda" else "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader)
        assert next(module.parameters()).device.type == where
        runs.append((callback, module))
    (cpu, cpu_module), (dev, dev_module) = runs
    assert cpu.decision.train and dev.decision.train
    assert dev.decision.target_steps == pytest.approx(cpu.decision.target_steps, rel=1e-6)
    assert cpu.stopped_step is not None and dev.stopped_step == cpu.stopped_step
    for p, q in zip(cpu_module.parameters(), dev_module.parameters(), strict=True):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-9, atol=1e-12)
