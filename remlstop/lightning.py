"""``REMLEarlyStopping`` for ``lightning.pytorch``: the remlstop callback as its Callback.

Import it the way you import Lightning: with ``lightning.pytorch`` write
``from remlstop.lightning import REMLEarlyStopping``; with ``pytorch_lightning`` use
``remlstop.pytorch_lightning``. (Lightning 2.4 refuses the other package's stateful callbacks.)

Example::

    from lightning.pytorch import Trainer
    from remlstop.lightning import REMLEarlyStopping

    stopper = REMLEarlyStopping(loss="half_mse", verbose=True)
    Trainer(callbacks=[stopper], max_epochs=10_000).fit(module, loader)
    print(stopper.decision)         # the test and every criterion, decided before the first step

The behaviour is documented in :mod:`remlstop._callback`; the options in
:class:`remlstop.StopperOptions`.
"""

from __future__ import annotations

try:
    import lightning.pytorch as _pl
    from lightning.pytorch.callbacks import early_stopping as _early_stopping
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"remlstop.lightning needs the `lightning` package ({err}): pip install lightning "
        "(or pip install 'remlstop[lightning]'). "
        "With `pytorch_lightning` installed instead, use remlstop.pytorch_lightning."
    ) from err

from ._callback import REMLEarlyStoppingBody

__all__ = ["REMLEarlyStopping"]


class REMLEarlyStopping(REMLEarlyStoppingBody, _pl.Callback):
    __doc__ = REMLEarlyStoppingBody.__doc__
    _pl_package = "lightning.pytorch"
    _es_module = _early_stopping
