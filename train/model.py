"""Encoders per modality, fusion modules, and the on-device batch preprocessing."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.data import MODALITIES

FUSIONS = ("concat", "weighted_sum", "product", "attention")
VIDEO_ENCODERS = ("gru", "attention")


def _block(a: int, b: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(a, b, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]


def conv_stack(in_ch: int, width: int) -> nn.Sequential:
    """Small CNN → global MAX pool → [B, width]. Max pooling keeps "is this pattern anywhere"
    (a corner, a tone's band): with average pooling it learned shapes several times slower."""
    # ceil_mode: a small input (few MFCC bins, a tiny image) pools down to 1 pixel, never to 0
    layers = _block(in_ch, 32, stride=2) + _block(32, 64) + [nn.MaxPool2d(2, ceil_mode=True)] + _block(64, 128)
    layers += [nn.MaxPool2d(2, ceil_mode=True)]
    layers += _block(128, width) + [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def masked_conv(stack: nn.Sequential, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """`conv_stack` over inputs padded along their last axis (variable-length audio: the batch's
    longest sets the width), each row as if it were alone: the frames from `frames[i]` on are
    zeroed on input and after every ReLU and pool, so each convolution sees there the zeros its
    own padding would give, and a ceil-mode pool or the global max (of ReLU outputs, ≥ 0) is
    not changed by them. Stride 2 and ceil-mode pools halve a length rounding up, as the layers
    do. (Training-mode BatchNorm statistics still count the pads.)"""
    length = frames.to(x.device).view(-1, 1, 1, 1)

    def mask(t: torch.Tensor) -> torch.Tensor:
        return t * (torch.arange(t.shape[-1], device=t.device) < length).to(t.dtype)

    x = mask(x)
    for layer in stack:
        x = layer(x)
        halves = isinstance(layer, nn.MaxPool2d) or (isinstance(layer, nn.Conv2d) and layer.stride[-1] == 2)
        if halves:
            length = (length + 1) // 2
        if isinstance(layer, (nn.ReLU, nn.MaxPool2d)):
            x = mask(x)
    return x


class TextEncoder(nn.Module):
    def __init__(self, vocab: int, width: int, kind: str, pad_id: int, max_len: int) -> None:
        super().__init__()
        self.kind, self.pad_id = kind, pad_id
        self.embed = nn.Embedding(vocab, width, padding_idx=pad_id)
        if kind == "transformer":
            self.pos = nn.Parameter(torch.zeros(1, max_len, width))
            layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            self.body = nn.GRU(width, width // 2, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over the non-pad positions; a row of pads only (no text) gives zeros, never NaN."""
        pad = tokens == self.pad_id
        x = self.embed(tokens)
        if self.kind == "transformer":
            # a fully masked row makes attention softmax over nothing (NaN in eval's fast path):
            # such rows attend unmasked; their output is discarded below and by the presence mask
            attend = pad & ~pad.all(dim=1, keepdim=True)
            # an empty batch (no row has text) has no mask attention could reshape
            x = self.body(x + self.pos[:, : x.shape[1]], src_key_padding_mask=attend if len(tokens) else None)
        elif len(tokens):
            # packed by length: the backward direction starts at each row's last token, so the
            # vectors do not depend on how many pads the batch's longest text adds after it
            lengths = (~pad).sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            x, _ = nn.utils.rnn.pad_packed_sequence(self.body(packed)[0], batch_first=True, total_length=tokens.shape[1])
        else:  # an empty batch (no row has text): nothing to pack, every parameter still in the graph
            x, _ = self.body(x)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class VideoEncoder(nn.Module):
    """[B, T, 3, S, S] clips → [B, width]: a CNN per frame, then a temporal model over the T frame
    vectors in time order ("gru": a GRU's last state; "attention": a Transformer layer over the
    frames with a learned embedding per position, mean-pooled).

    The frame CNN also gets each pixel's (x, y) as two input channels: its global max pool keeps
    *what* a frame shows but not *where*, and motion is a change of where (without them, left vs
    right motion stayed at chance)."""

    def __init__(self, width: int, frames: int, kind: str) -> None:
        super().__init__()
        if kind not in VIDEO_ENCODERS:
            raise ValueError(f"unknown video encoder {kind!r}; choose from {VIDEO_ENCODERS}")
        self.kind = kind
        self.frame = conv_stack(5, width)
        if kind == "attention":
            self.pos = nn.Parameter(torch.randn(1, frames, width) * 0.02)
            self.mix = nn.Linear(2 * width, width)
            layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
        else:
            self.body = nn.GRU(width, width, batch_first=True)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        b, t, _, h, w = clips.shape
        frames = clips.flatten(0, 1)
        ys = torch.linspace(-1, 1, h, device=clips.device, dtype=clips.dtype).view(1, 1, h, 1).expand(len(frames), 1, h, w)
        xs = torch.linspace(-1, 1, w, device=clips.device, dtype=clips.dtype).view(1, 1, 1, w).expand(len(frames), 1, h, w)
        v = self.frame(torch.cat([frames, xs, ys], dim=1)).unflatten(0, (b, t))
        if self.kind == "attention":
            step = v - torch.cat([v[:, :1], v[:, :-1]], dim=1)
            return self.norm(self.body(self.mix(torch.cat([v, step], dim=2)) + self.pos[:, :t]).mean(1))
        return self.body(v)[1][-1]


class Fusion(nn.Module):
    """[B, n, W] modality vectors + [B, n] presence → [B, F] fused features.

    An absent modality's vector is replaced by zeros with `torch.where` (never multiplied by
    the mask: NaN × 0 is NaN), so no input of an absent modality can reach the output."""

    def __init__(self, kind: str, width: int, n: int = 3) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"unknown fusion {kind!r}; choose from {FUSIONS}")
        self.kind = kind
        # "product": every non-empty subset's elementwise product, singles first (a, b, c, ab, ac, bc, abc for 3)
        self.subsets = [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]
        if kind == "weighted_sum":
            self.logits = nn.Parameter(torch.zeros(n))
        if kind == "attention":
            self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.modality_embed = nn.Parameter(torch.randn(1, n, width) * 0.02)
            self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
            self.norm = nn.LayerNorm(width)
        self.out_dim = {"concat": n * width, "weighted_sum": width, "product": len(self.subsets) * width, "attention": width}[kind]

    def forward(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        z = torch.where(present.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
        if self.kind == "concat":
            return z.flatten(1)
        if self.kind == "weighted_sum":
            logits = self.logits.expand_as(present).masked_fill(~present, float("-inf"))
            weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # no modality at all: zeros, not NaN
            return (weights.unsqueeze(-1) * z).sum(1)
        if self.kind == "product":
            return torch.cat([math.prod(z[:, i] for i in subset) for subset in self.subsets], dim=1)
        tokens = torch.cat([self.cls.expand(z.shape[0], -1, -1), z + self.modality_embed], dim=1)
        pad = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)  # the CLS token is never masked
        return self.norm(self.layer(tokens, src_key_padding_mask=pad)[:, 0])


class FusionModel(nn.Module):
    """Encoders → per-modality projections → fusion → classifier head.

    Only the modalities the data has (dataset.json features) and the run uses (train.modalities)
    get an encoder; the others are absent in every sample. With `aux_heads`, each modality also
    has its own linear classifier on its projected vector (unimodal auxiliary losses in the
    recipe), so every encoder learns on its own merit. The fusion has a slot for video only when
    the model uses video: a model without has the 3-slot fusion of before video existed (the
    same weights, so its old checkpoints load), and pays nothing for an always-absent input."""

    def __init__(self, spec: dict[str, Any], fusion: str, width: int, text_encoder: str, aux_heads: bool = False,
                 modalities: tuple[str, ...] | list[str] = MODALITIES, video_encoder: str = "gru") -> None:
        super().__init__()
        f = spec["features"]
        active = [m in modalities and m in f for m in MODALITIES]
        if not any(active):
            raise ValueError(f"train.modalities {list(modalities)} are not in the data (it has {', '.join(f) or 'none'})")
        self.register_buffer("use", torch.tensor(active), persistent=False)
        self.active = tuple(active)  # the same as plain bools: no device sync or graph break where code branches on it
        self.slots = len(MODALITIES) if active[3] else 3
        classes = max(1, len(spec["labels"]))
        self.image = conv_stack(3, width) if active[0] else None
        self.audio = conv_stack(1, width) if active[1] else None
        text = f.get("text", {})
        self.text = TextEncoder(text["vocab_size"], width, text_encoder, text["pad_id"], text["max_tokens"]) if active[2] else None
        self.video = VideoEncoder(width, f["video"]["frames"], video_encoder) if active[3] else None
        self.proj = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) if a else nn.Identity()
                                   for a in active])
        self.fusion = Fusion(fusion, width, self.slots)
        self.head = nn.Sequential(nn.Linear(self.fusion.out_dim, width), nn.GELU(), nn.Dropout(0.1), nn.Linear(width, classes))
        self.aux = nn.ModuleList([nn.Linear(width, classes) if a else nn.Identity() for a in active]) if aux_heads else None

    def encode(self, image: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, video: torch.Tensor,
               present: torch.Tensor, audio_frames: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 4, width] projected modality vectors, zeros where a sample lacks the modality (or
        the model does not use it). Each encoder runs on the rows that have its modality only: a
        clip costs T image encodings, and a batch with few clips pays for those few. A batch
        without any runs it on no rows, so every parameter is still in the graph (DDP).
        `audio_frames`: each row's own spectrogram length where the batch pads them to its
        longest (`audio.clip_seconds: 0`); the vector then does not depend on that padding."""
        inputs = ((self.image, image), (self.audio, audio.unsqueeze(1)), (self.text, text), (self.video, video))
        n = len(present)
        vectors: dict[int, torch.Tensor] = {}
        for m, (enc, x) in enumerate(inputs):
            if enc is None:
                continue
            rows = present[:, m].nonzero().squeeze(1)
            every = len(rows) == n
            x = x if every else x.index_select(0, rows)
            if m == 1 and audio_frames is not None:
                frames = audio_frames.to(x.device)
                v = self.proj[m](masked_conv(enc, x, frames if every else frames.index_select(0, rows)))
            else:
                v = self.proj[m](enc(x))
            vectors[m] = v if every else v.new_zeros((n, v.shape[1])).index_copy(0, rows, v)
        some = next(iter(vectors.values()))
        return torch.stack([vectors.get(m, some.new_zeros(some.shape)) for m in range(len(MODALITIES))], dim=1)

    def classify(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fused logits [B, C] of encoded vectors under a presence mask (evaluation re-uses one
        encoding for several masks)."""
        return self.head(self.fusion(z[:, : self.slots], (present & self.use)[:, : self.slots]))

    def forward(self, image: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, video: torch.Tensor,
                present: torch.Tensor, with_aux: bool = False, fused: torch.Tensor | None = None,
                audio_frames: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C]; with `with_aux` also the unimodal heads' logits [B, 4, C] (zeros for an
        unused modality). `fused`: the presence the fusion sees, if not `present` (modality
        dropout: the unimodal heads still train on every modality a sample has). `audio_frames`:
        as for `encode`."""
        z = self.encode(image, audio, text, video, present & self.use, audio_frames)
        logits = self.classify(z, present if fused is None else fused)
        if not with_aux:
            return logits
        if self.aux is None:
            raise ValueError("this model has no unimodal heads (train.aux_loss was 0)")
        aux = [self.aux[m](z[:, m]) if self.active[m] else logits.new_zeros(logits.shape) for m in range(len(MODALITIES))]
        return logits, torch.stack(aux, dim=1).to(logits.dtype)


def build_model(spec: dict[str, Any], train_params: dict[str, Any]) -> FusionModel:
    """The model a run's train params describe (runs from before a param existed get its old behaviour)."""
    p = train_params
    return FusionModel(spec, p["fusion"], p["width"], p["text_encoder"], aux_heads=p.get("aux_loss", 0.0) > 0,
                       modalities=tuple(p.get("modalities", MODALITIES)), video_encoder=p.get("video_encoder", "gru"))


def modality_dropout(present: torch.Tensor, p: float, single: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time presence: a `single` share of samples keeps one random present modality
    only (so the head learns each modality alone, as evaluate's ablation and a user's partial
    input use it); the others drop each present modality with probability p. A sample never
    loses all of its modalities."""
    if p <= 0 and single <= 0:
        return present
    dev = present.device
    drop = torch.rand(present.shape, device=dev, generator=generator) < p
    kept = present & ~drop
    empty = ~kept.any(dim=1)
    # one present modality, chosen at random (ties broken by noise), for single-modality samples
    # and for samples that lost all of them
    noise = torch.rand(present.shape, device=dev, generator=generator)
    pick = torch.argmax(torch.where(present, noise, -1.0), dim=1)
    one = torch.zeros_like(present).scatter_(1, pick.unsqueeze(1), True) & present
    alone = torch.rand(present.shape[0], device=dev, generator=generator) < single
    return torch.where((alone | empty).unsqueeze(1), one, kept)


class Preprocess(nn.Module):
    """On-device normalization (dataset.json statistics) and batched augmentation."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        f = spec["features"]
        image = f.get("image", {"mean": [0.0] * 3, "std": [1.0] * 3})
        audio = f.get("audio", {"mean": [0.0], "std": [1.0]})
        video = f.get("video", {"mean": [0.0] * 3, "std": [1.0] * 3})
        self.register_buffer("img_mean", torch.tensor(image["mean"]).view(1, 3, 1, 1))
        self.register_buffer("img_std", torch.tensor(image["std"]).view(1, 3, 1, 1))
        self.register_buffer("mel_mean", torch.tensor(audio["mean"]).view(1, -1, 1))
        self.register_buffer("mel_std", torch.tensor(audio["std"]).view(1, -1, 1))
        self.register_buffer("vid_mean", torch.tensor(video["mean"]).view(1, 1, 3, 1, 1))
        self.register_buffer("vid_std", torch.tensor(video["std"]).view(1, 1, 3, 1, 1))

    def forward(self, batch: dict[str, torch.Tensor], augment: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, audio, video), normalized; augmented when training."""
        image = (batch["image"].float() / 255.0 - self.img_mean) / self.img_std
        audio = (batch["audio"] - self.mel_mean) / self.mel_std
        video = (batch["video"].float() / 255.0 - self.vid_mean) / self.vid_std
        if augment:
            image = random_resized_crop(image)
            audio = spec_augment(audio)
            # one crop for all frames of a clip, never flipped: the direction of motion can be the label
            video = random_resized_crop(video.flatten(0, 1), flip=False, group=video.shape[1]).view_as(video)
        return image, audio, video


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float] = (0.75, 1.0), flip: bool = True,
                        group: int = 1) -> torch.Tensor:
    """Per-sample random zoom/shift (and horizontal flip) in one batched affine resample; each
    `group` consecutive rows (the frames of a clip) share one draw."""
    n = x.shape[0] // group
    s = torch.empty(n, device=x.device).uniform_(math.sqrt(scale[0]), math.sqrt(scale[1]))
    tx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - s)
    ty = (torch.rand(n, device=x.device) * 2 - 1) * (1 - s)
    mirror = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=x.device)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = s * mirror, tx
    theta[:, 1, 1], theta[:, 1, 2] = s, ty
    grid = F.affine_grid(theta.repeat_interleave(group, dim=0), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def spec_augment(mel: torch.Tensor, max_freq: int = 8, max_time: int = 10) -> torch.Tensor:
    """One frequency band and one time span masked per sample (SpecAugment-style)."""
    n, bins, frames = mel.shape
    dev = mel.device
    fw = torch.randint(0, max_freq + 1, (n, 1), device=dev)
    f0 = (torch.rand(n, 1, device=dev) * (bins - fw).clamp(min=1)).long()
    tw = torch.randint(0, max_time + 1, (n, 1), device=dev)
    t0 = (torch.rand(n, 1, device=dev) * (frames - tw).clamp(min=1)).long()
    fr = torch.arange(bins, device=dev).view(1, -1)
    tr = torch.arange(frames, device=dev).view(1, -1)
    fmask = ((fr >= f0) & (fr < f0 + fw)).unsqueeze(-1)
    tmask = ((tr >= t0) & (tr < t0 + tw)).unsqueeze(1)
    return mel.masked_fill(fmask | tmask, 0.0)
