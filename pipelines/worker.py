"""A local Beam worker process of `prepare --workers N` (N > 1): Beam's own SDK worker
(`apache_beam.runners.worker.sdk_worker_main`), started without pandas.

Beam's `typehints` package imports pandas whenever it is installed, for its DataFrame type
hints, which prepare never uses; that import is ~0.5 s of every worker's start-up here (and
of the driver's: `mmprep prepare` blocks it too, see `block_pandas`). Everything else is
Beam's: its options, control and logging channels come in the environment as usual.
"""

from __future__ import annotations

import runpy
import sys


def block_pandas() -> None:
    """Make `import pandas` fail in this process (an ImportError that Beam's optional imports
    expect), unless something has imported it already."""
    sys.modules.setdefault("pandas", None)


if __name__ == "__main__":
    block_pandas()
    runpy.run_module("apache_beam.runners.worker.sdk_worker_main", run_name="__main__", alter_sys=True)
