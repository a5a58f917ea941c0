"""What a command prints: our own lines by default, third-party logs with -v, debug with -vv."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

OURS = (b"[mmprep", b"mmprep ")


def suggest(flag: str, *candidates: list[str]) -> str:
    """" (did you mean --x?)" naming the known flag closest to `flag`; earlier candidate lists
    win ties (mmprep's own flags before Beam's: --wokers is --workers, not --num_workers)."""
    import difflib

    best, found = 0.0, ""
    for names in candidates:
        for name in names:
            score = difflib.SequenceMatcher(None, flag, name).ratio()
            if score > best:
                best, found = score, name
    return f" (did you mean {found}?)" if best >= 0.75 else ""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown option is named with the closest known one,
    before argparse would complain about something else (a required option it took for a typo)."""

    def known_flags(self) -> list[str]:
        return [o for o in self._option_string_actions if o.startswith("--")]

    def unknown(self, argv: list[str]) -> str | None:
        known = set(self._option_string_actions)
        return next((a.split("=", 1)[0] for a in argv if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in known
                     and not _number(a)), None)

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001 - argparse's signature
        flag = self.unknown(list(args) if args is not None else [])
        if flag is not None:
            self.error(f"unknown option {flag}{suggest(flag, self.known_flags())}")
        return super().parse_args(args, namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """A command's --help: each option's default where it has one (not "None"), the epilog's
    example laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.required:
            return action.help or ""
        return super()._get_help_string(action)  # the prefixes of the lines we print while a pipeline runs


def set_verbosity(verbose: int) -> None:
    """0: our lines only (libraries' warnings and logs hidden); 1: their INFO logs and
    warnings; 2: DEBUG."""
    level = (logging.ERROR, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s:%(name)s:%(message)s")
    logging.getLogger().setLevel(level)
    for name in ("apache_beam", "dvc", "dvclive", "datasets", "numba", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(level if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # processes we start (Beam workers) too


@contextmanager
def only_our_lines(enabled: bool) -> Iterator[str | None]:
    """While enabled, everything written to file descriptor 2 — by this process, its threads
    and the processes it starts (Beam's worker processes log their start-up and shutdown at
    INFO there) — goes through a filter that lets our own lines through (OURS) and keeps the
    rest in a log file, whose path is yielded (None when disabled). The file is removed when
    the block ends without an error; after an error its path is worth printing."""
    if not enabled:
        yield None
        return
    fd, log_path = tempfile.mkstemp(prefix="mmprep-", suffix=".log")
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        with os.fdopen(fd, "wb") as log, os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                pending += chunk
                *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    log.write(line + b"\n")
                    if line.lstrip().startswith(OURS):
                        os.write(saved, line + b"\n")
            if pending:
                log.write(pending)
                if pending.lstrip().startswith(OURS):
                    os.write(saved, pending + b"\n")

    thread = threading.Thread(target=pump, name="mmprep-stderr", daemon=True)
    thread.start()
    failed = True
    try:
        yield log_path
        failed = False
    finally:
        os.dup2(saved, 2)  # our pipe's last writers are processes that outlived the block, if any
        thread.join(timeout=5)
        os.close(saved)
        if not failed:
            try:
                os.unlink(log_path)
            except OSError:
                pass
