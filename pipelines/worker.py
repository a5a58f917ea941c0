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


class _NoPandas:
    """A meta-path finder under which `import pandas` raises ModuleNotFoundError, as if it were
    not installed. (A `None` in `sys.modules` would do that for Python code, but Cython's
    import, as in pyarrow's pandas shim, takes the `None` as the module and fails later.)"""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r} (prepare runs without pandas)", name=name)
        return None


def block_pandas() -> None:
    """Make `import pandas` fail in this process (an ImportError that Beam's and pyarrow's
    optional imports expect), unless something has imported it already."""
    if "pandas" not in sys.modules and not any(isinstance(f, _NoPandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())


if __name__ == "__main__":
    block_pandas()
    runpy.run_module("apache_beam.runners.worker.sdk_worker_main", run_name="__main__", alter_sys=True)
