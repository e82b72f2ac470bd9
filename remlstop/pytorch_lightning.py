"""``REMLEarlyStopping`` for ``pytorch_lightning``: the remlstop callback as its Callback.

Import it the way you import Lightning: with ``pytorch_lightning`` write
``from remlstop.pytorch_lightning import REMLEarlyStopping``; with ``lightning.pytorch`` use
``remlstop.lightning``. (Lightning 2.4 refuses the other package's stateful callbacks.)

Example::

    from pytorch_lightning import Trainer
    from remlstop.pytorch_lightning import REMLEarlyStopping

    stopper = REMLEarlyStopping(loss="half_mse", verbose=True)
    Trainer(callbacks=[stopper], max_epochs=10_000).fit(module, loader)
    print(stopper.decision)         # the test and every criterion, decided before the first step

The behaviour is documented in :mod:`remlstop._callback`; the options in
:class:`remlstop.StopperOptions`.
"""

from __future__ import annotations

try:
    import pytorch_lightning as _pl
    from pytorch_lightning.callbacks import early_stopping as _early_stopping
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"remlstop.pytorch_lightning needs the `pytorch-lightning` package ({err}): "
        "pip install pytorch-lightning "
        "(or pip install 'remlstop[pytorch-lightning]'). "
        "With `lightning.pytorch` installed instead, use remlstop.lightning."
    ) from err

from ._callback import REMLEarlyStoppingBody

__all__ = ["REMLEarlyStopping"]


class REMLEarlyStopping(REMLEarlyStoppingBody, _pl.Callback):
    __doc__ = REMLEarlyStoppingBody.__doc__
    _pl_package = "pytorch_lightning"
    _es_module = _early_stopping
