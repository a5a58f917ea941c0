"""Progress of training and evaluation: a bar on a terminal, plain lines in logs."""

from __future__ import annotations

import os
import sys


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, leave: bool = False):
    """A tqdm bar (rate, ETA) on a terminal; None when stderr is not one (CI, logs, DVC): then
    the loop prints plain lines every `log_every` steps instead of a bar's control characters."""
    if not sys.stderr.isatty() or os.environ.get("MMPREP_NO_BAR"):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit,
                dynamic_ncols=True, leave=leave)
