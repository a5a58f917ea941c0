"""params.yaml → typed, validated dataclasses (one section per stage).

Code receives these dataclasses, never dicts. Unknown keys and wrong types are
errors with the dotted path of the offending key, so a typo in params.yaml
fails the run with one clear line instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A params file or value is invalid; the message names the key."""


@dataclass(frozen=True)
class DemoCorpusConfig:
    samples: int = 2000
    seed: int = 0
    dirt_ratio: float = 0.05
    task: Literal["combined", "redundant"] = "combined"
    missing: float = 0.0
    video: float = 0.0

    def validate(self) -> None:
        _check(self.samples >= 30, "demo_corpus.samples", "must be >= 30")
        _check(0.0 <= self.video <= 1.0, "demo_corpus.video", "must be in [0, 1]")
        _check(0.0 <= self.missing <= 1.0, "demo_corpus.missing", "must be in [0, 1]")
        _check(0.0 <= self.dirt_ratio <= 0.5, "demo_corpus.dirt_ratio", "must be in [0, 0.5]")


@dataclass(frozen=True)
class ImageConfig:
    size: int = 224
    jpeg_quality: int = 90
    max_pixels: int = 50_000_000
    min_side: int = 16
    max_aspect: float = 8.0

    def validate(self) -> None:
        _check(8 <= self.size <= 4096, "prepare.image.size", "must be in [8, 4096]")
        _check(1 <= self.jpeg_quality <= 100, "prepare.image.jpeg_quality", "must be in [1, 100]")
        _check(self.max_pixels > 0, "prepare.image.max_pixels", "must be > 0")
        _check(self.min_side >= 1, "prepare.image.min_side", "must be >= 1")
        _check(self.max_aspect >= 1.0, "prepare.image.max_aspect", "must be >= 1")


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    min_duration: float = 0.1
    max_duration: float = 60.0
    too_long: Literal["crop", "reject"] = "crop"
    clip_seconds: float = 2.0
    crop: Literal["start", "center"] = "center"
    normalize: Literal["peak", "rms", "none"] = "peak"
    silence_db: float = -60.0
    feature: Literal["logmel", "mfcc"] = "logmel"
    n_mels: int = 64
    n_fft: int = 512
    hop_length: int = 256
    n_mfcc: int = 20

    def validate(self) -> None:
        p = "prepare.audio."
        _check(1000 <= self.sample_rate <= 384000, p + "sample_rate", "must be in [1000, 384000]")
        _check(self.min_duration >= 0, p + "min_duration", "must be >= 0")
        _check(self.max_duration > self.min_duration, p + "max_duration", "must be > min_duration")
        _check(self.clip_seconds >= 0, p + "clip_seconds", "must be >= 0 (0 keeps the length)")
        _check(self.n_fft >= 16 and self.hop_length >= 1, p + "n_fft", "n_fft >= 16, hop_length >= 1")
        _check(1 <= self.n_mels <= 512, p + "n_mels", "must be in [1, 512]")
        _check(1 <= self.n_mfcc <= self.n_mels, p + "n_mfcc", "must be in [1, n_mels]")


@dataclass(frozen=True)
class VideoConfig:
    frames: int = 8
    size: int = 64
    jpeg_quality: int = 90
    max_pixels: int = 8_847_360  # 4096x2160
    max_duration: float = 600.0
    max_frames: int = 100_000
    min_side: int = 16
    max_aspect: float = 8.0
    audio_track: Literal["use", "ignore"] = "use"
    seek: bool = True

    def validate(self) -> None:
        p = "prepare.video."
        _check(1 <= self.frames <= 256, p + "frames", "must be in [1, 256]")
        _check(8 <= self.size <= 1024, p + "size", "must be in [8, 1024]")
        _check(1 <= self.jpeg_quality <= 100, p + "jpeg_quality", "must be in [1, 100]")
        _check(self.max_pixels > 0, p + "max_pixels", "must be > 0")
        _check(self.max_duration > 0, p + "max_duration", "must be > 0")
        _check(self.max_frames >= 1, p + "max_frames", "must be >= 1")
        _check(self.min_side >= 1, p + "min_side", "must be >= 1")
        _check(self.max_aspect >= 1.0, p + "max_aspect", "must be >= 1")


@dataclass(frozen=True)
class TextConfig:
    max_chars: int = 2000
    max_tokens: int = 64
    vocab_size: int = 2000
    character_coverage: float = 0.98
    tokenizer_sample: int = 200_000

    def validate(self) -> None:
        p = "prepare.text."
        _check(self.max_chars >= 1, p + "max_chars", "must be >= 1")
        _check(self.max_tokens >= 1, p + "max_tokens", "must be >= 1")
        _check(self.vocab_size >= 16, p + "vocab_size", "must be >= 16")
        _check(0.5 <= self.character_coverage <= 1.0, p + "character_coverage", "must be in [0.5, 1]")
        _check(self.tokenizer_sample >= 1, p + "tokenizer_sample", "must be >= 1")


@dataclass(frozen=True)
class LabelRule:
    pattern: str
    label: str


@dataclass(frozen=True)
class LabelConfig:
    case: Literal["lower", "keep"] = "lower"
    labels: tuple[str, ...] = ()
    unlabeled: Literal["keep", "reject"] = "keep"
    rules: tuple[LabelRule, ...] = ()

    def validate(self) -> None:
        import re

        for i, rule in enumerate(self.rules):
            try:
                re.compile(rule.pattern)
            except re.error as err:
                raise ConfigError(f"prepare.label.rules[{i}].pattern: invalid regex: {err}") from None
        _check(len(set(self.labels)) == len(self.labels), "prepare.label.labels", "has repeated labels")
        # labels equal once normalized: mmprep.labels.check_fixed_labels (prepare runs it; it needs the text module)


@dataclass(frozen=True)
class ShardConfig:
    max_samples: int = 1000
    max_bytes: int = 256_000_000

    def validate(self) -> None:
        _check(self.max_samples >= 1, "prepare.shard.max_samples", "must be >= 1")
        _check(self.max_bytes >= 1024, "prepare.shard.max_bytes", "must be >= 1024")


@dataclass(frozen=True)
class PrepareConfig:
    max_reject_ratio: float = 0.5
    max_file_bytes: int = 256_000_000
    on_bad_modality: Literal["reject", "drop"] = "reject"
    split_salt: str = "mmprep"
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    link_modalities: tuple[str, ...] = ("image", "audio", "text", "video")
    phash_distance: int = 6
    max_link_share: float = 0.02
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    row_timeout: float = 10.0  # seconds one row may take to process (0: no child process, no limit)
    row_memory_mb: int = 1024  # memory one row's processing may add (0: unlimited)

    def validate(self) -> None:
        _check(self.row_timeout >= 0, "prepare.row_timeout", "must be >= 0 (0 turns the limit off)")
        _check(self.row_memory_mb >= 0, "prepare.row_memory_mb", "must be >= 0 (0 turns the limit off)")
        _check(0.0 <= self.max_reject_ratio <= 1.0, "prepare.max_reject_ratio", "must be in [0, 1]")
        _check(self.max_file_bytes >= 1, "prepare.max_file_bytes", "must be >= 1")
        bad = set(self.splits) - {"train", "val", "test"}
        _check(not bad, "prepare.splits", f"unknown split names {sorted(bad)} (train/val/test)")
        _check("train" in self.splits, "prepare.splits", "needs a train ratio")
        _check(all(v >= 0 for v in self.splits.values()), "prepare.splits", "ratios must be >= 0")
        _check(abs(sum(self.splits.values()) - 1.0) < 1e-6, "prepare.splits", "ratios must sum to 1")
        bad = set(self.link_modalities) - {"image", "audio", "text", "video"}
        _check(not bad, "prepare.link_modalities", f"unknown modalities {sorted(bad)}")
        _check(0 <= self.phash_distance <= 32, "prepare.phash_distance", "must be in [0, 32]")
        _check(0 < self.max_link_share <= 1, "prepare.max_link_share", "must be in (0, 1]")
        for sub in (self.image, self.audio, self.video, self.text, self.label, self.shard):
            sub.validate()


@dataclass(frozen=True)
class TrainConfig:
    fusion: Literal["concat", "weighted_sum", "product", "attention"] = "concat"
    text_encoder: Literal["transformer", "gru"] = "transformer"
    video_encoder: Literal["gru", "attention"] = "gru"
    width: int = 128
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    shuffle_buffer: int = 1000
    modality_dropout: float = 0.2
    single_modality: float = 0.2
    aux_loss: float = 0.5
    modalities: tuple[str, ...] = ("image", "audio", "text", "video")
    augment: bool = True
    num_workers: int = 0
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    max_steps: int = 0

    def validate(self) -> None:
        p = "train."
        _check(self.width >= 8 and self.width % 4 == 0, p + "width", "must be a multiple of 4, >= 8 (4 attention heads; the GRU halves it)")
        _check(self.epochs >= 1, p + "epochs", "must be >= 1")
        _check(self.batch_size >= 1, p + "batch_size", "must be >= 1")
        _check(self.lr > 0, p + "lr", "must be > 0")
        _check(self.warmup_steps >= 0, p + "warmup_steps", "must be >= 0 (0 = no warm-up)")
        _check(self.grad_clip > 0, p + "grad_clip", "must be > 0 (the largest gradient norm; a large value barely clips)")
        _check(self.shuffle_buffer >= 0, p + "shuffle_buffer", "must be >= 0 (0 = no shuffling)")
        _check(self.log_every >= 1, p + "log_every", "must be >= 1 (steps between log lines)")
        _check(self.checkpoint_every >= 1, p + "checkpoint_every", "must be >= 1 (steps between checkpoints)")
        _check(0.0 <= self.modality_dropout < 1.0, p + "modality_dropout", "must be in [0, 1)")
        _check(0.0 <= self.single_modality <= 1.0, p + "single_modality", "must be in [0, 1]")
        _check(self.aux_loss >= 0.0, p + "aux_loss", "must be >= 0 (0 = no unimodal heads)")
        bad = [m for m in self.modalities if m not in ("image", "audio", "text", "video")]
        _check(not bad, p + "modalities", f"unknown modalities {bad} (image, audio, text, video)")
        _check(bool(self.modalities) and len(set(self.modalities)) == len(self.modalities), p + "modalities",
               "must name each used modality once (at least one)")
        _check(self.num_workers >= 0, p + "num_workers", "must be >= 0")
        _check(self.max_steps >= 0, p + "max_steps", "must be >= 0 (0 = epochs decide)")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 128
    split: str = "test"

    def validate(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1")
        _check(self.split in ("train", "val", "test"), "evaluate.split", "must be train, val or test")


@dataclass(frozen=True)
class Params:
    demo_corpus: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validate(self) -> None:
        for sub in (self.demo_corpus, self.prepare, self.train, self.evaluate):
            sub.validate()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from plain data, checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{path}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def params_from_dict(data: dict[str, Any] | None) -> Params:
    params = _build(Params, data or {}, "")
    params.validate()
    return params


def load_params(path: str | Path | list[str | Path] | None) -> Params:
    """Read and validate a params.yaml; None gives the built-in defaults. Several files are
    layered in order: a later file's keys replace an earlier one's, section by section
    (`--params params.yaml --params params-video.yaml`: a base and what one run changes)."""
    if path is None or path == []:
        return params_from_dict({})
    import yaml

    merged: dict[str, Any] = {}
    for one in path if isinstance(path, list) else [path]:
        p = Path(one)
        if not p.is_file():
            raise ConfigError(f"params file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
        merged = _layered(merged, data) if isinstance(data, dict) else data
    return params_from_dict(merged)


def _layered(base: dict[str, Any], top: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """`top` over `base`: sections (the dataclasses of `cls`, Params at the top) merge key by
    key; any param's value — a number, a list, a mapping such as `prepare.splits` — is replaced."""
    hints = typing.get_type_hints(cls or Params)
    out = dict(base)
    for key, value in top.items():
        section = hints.get(key)
        merge = dataclasses.is_dataclass(section) and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _layered(out[key], value, section) if merge else value
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass → plain JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
