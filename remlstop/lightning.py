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

from ._callback import bind

__all__ = ["REMLEarlyStopping"]

REMLEarlyStopping = bind("lightning.pytorch", __name__)
