"""`make demo`: the README's demo, REMLEarlyStopping in a Lightning run.

A thin wrapper: runs ``main()`` of ``examples/lightning_mlp.py`` (same flags).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_mlp import main  # noqa: E402

if __name__ == "__main__":
    main()
