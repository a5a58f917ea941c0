"""Label normalization, weak labelling rules and the label map."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from mmprep.config import LabelConfig
from mmprep.records import RecordError


def normalize_label(raw: str | None, case: str) -> str | None:
    """NFKC, the invisible layout characters text normalization drops (zero-width space, bidi
    marks, controls …) dropped, whitespace collapsed and stripped, lower-cased when case ==
    "lower"; blank → None."""
    if raw is None:
        return None
    from mmprep.text import drop_invisible

    label = " ".join(drop_invisible(unicodedata.normalize("NFKC", raw)).split())
    if case == "lower":
        label = label.lower()
    return label or None


def weak_label(text: str | None, cfg: LabelConfig) -> str | None:
    """The first rule whose regex matches the (normalized) text labels an unlabeled row."""
    if not text:
        return None
    for rule in cfg.rules:
        if re.search(rule.pattern, text, flags=re.IGNORECASE):
            return normalize_label(rule.label, cfg.case)
    return None


def resolve_label(raw: str | None, text: str | None, cfg: LabelConfig) -> tuple[str | None, str]:
    """(label, how) where how is "given", "rule" or "none"; raises RecordError per policy."""
    label = normalize_label(raw, cfg.case)
    how = "given"
    if label is None:
        label = weak_label(text, cfg)
        how = "rule" if label is not None else "none"
    if label is None and cfg.unlabeled == "reject":
        raise RecordError("unlabeled", "no label and no rule matched")
    fixed = fixed_labels(cfg)
    if label is not None and fixed and label not in fixed:
        raise RecordError("unknown_label", f"{label!r} is not in prepare.label.labels")
    return label, how


def check_fixed_labels(cfg: LabelConfig) -> None:
    """A fixed label list whose entries normalize to one name, or to nothing, is a ConfigError."""
    from mmprep.config import ConfigError

    seen: dict[str, str] = {}
    for raw in cfg.labels:
        name = normalize_label(raw, cfg.case)
        if name is None:
            raise ConfigError(f"prepare.label.labels: {raw!r} is empty once normalized (a class no row can have)")
        if name in seen:
            raise ConfigError(f"prepare.label.labels: {seen[name]!r} and {raw!r} are the same label once normalized "
                              f"({name!r}; label.case: {cfg.case})")
        seen[name] = raw


def fixed_labels(cfg: LabelConfig) -> tuple[str, ...]:
    return tuple(normalize_label(x, cfg.case) or "" for x in cfg.labels)


def build_label_map(seen: Iterable[str], cfg: LabelConfig) -> list[str]:
    """The fixed list from params (its order), else the sorted distinct labels seen."""
    fixed = fixed_labels(cfg)
    if fixed:
        return list(fixed)
    return sorted(set(seen))
