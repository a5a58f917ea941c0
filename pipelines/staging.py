"""Where processed rows wait between processing and the shard writer: a content-addressed
store of entries (`mmprep.staged`) under a directory Beam's FileSystems can reach.

With `--cache DIR` (the default, see `default_cache`) the store outlives the run and a
rerun reuses every entry whose row and params are unchanged; with `--no-cache` it is a
private directory inside the output that the run deletes when it finishes.

Writes are atomic (a temporary name, then a rename) and entries carry a checksum, so a
killed run leaves at worst an orphan temporary file or an entry that fails its check —
never one a later run trusts wrongly.
"""

from __future__ import annotations

import os
import posixpath
import uuid

from apache_beam.io.filesystems import FileSystems


def default_cache() -> str:
    """$MMPREP_CACHE, else $XDG_CACHE_HOME/mmprep, else ~/.cache/mmprep."""
    if os.environ.get("MMPREP_CACHE"):
        return os.environ["MMPREP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmprep")


def _join(*parts: str) -> str:
    return FileSystems.join(*parts) if FileSystems.get_scheme(parts[0]) else posixpath.join(*parts)


class Store:
    """Entries by name under `root/rows/<2 hex>/<name>`; local paths use plain file calls."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.local = FileSystems.get_scheme(root) in (None, "file")

    def path(self, name: str) -> str:
        return _join(self.root, "rows", name[:2], name)

    def get(self, name: str) -> bytes | None:
        path = self.path(name)
        try:
            if self.local:
                with open(path, "rb") as f:
                    return f.read()
            with FileSystems.open(path, compression_type="uncompressed") as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None
        except Exception:  # noqa: BLE001 - a remote filesystem's own "not found" error
            return None

    def put(self, name: str, data: bytes) -> None:
        path = self.path(name)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        with FileSystems.create(tmp) as f:
            f.write(data)
        FileSystems.rename([tmp], [path])
