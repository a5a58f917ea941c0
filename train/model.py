"""Encoders per modality, fusion modules, and the on-device batch preprocessing."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("concat", "weighted_sum", "product", "attention")


def _block(a: int, b: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(a, b, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]


def conv_stack(in_ch: int, width: int) -> nn.Sequential:
    """Small CNN → global MAX pool → [B, width]. Max pooling keeps "is this pattern anywhere"
    (a corner, a tone's band): with average pooling it learned shapes several times slower."""
    layers = _block(in_ch, 32, stride=2) + _block(32, 64) + [nn.MaxPool2d(2)] + _block(64, 128) + [nn.MaxPool2d(2)]
    layers += _block(128, width) + [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


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
        pad = tokens == self.pad_id
        x = self.embed(tokens)
        if self.kind == "transformer":
            x = self.body(x + self.pos[:, : x.shape[1]], src_key_padding_mask=pad)
        else:
            x, _ = self.body(x)
        keep = (~pad).unsqueeze(-1).float()
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class Fusion(nn.Module):
    """[B, 3, W] modality vectors + [B, 3] presence → [B, F] fused features."""

    def __init__(self, kind: str, width: int) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"unknown fusion {kind!r}; choose from {FUSIONS}")
        self.kind = kind
        if kind == "weighted_sum":
            self.logits = nn.Parameter(torch.zeros(3))
        if kind == "attention":
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.modality_embed = nn.Parameter(torch.randn(1, 3, width) * 0.02)
            self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.out_dim = {"concat": 3 * width, "weighted_sum": width, "product": 7 * width, "attention": width}[kind]

    def forward(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mask = present.unsqueeze(-1).to(z.dtype)
        z = z * mask
        if self.kind == "concat":
            return z.flatten(1)
        if self.kind == "weighted_sum":
            logits = self.logits.expand_as(present).masked_fill(~present, float("-inf"))
            return (torch.softmax(logits, dim=1).unsqueeze(-1) * z).sum(1)
        if self.kind == "product":
            a, b, c = z[:, 0], z[:, 1], z[:, 2]
            return torch.cat([a, b, c, a * b, a * c, b * c, a * b * c], dim=1)
        tokens = torch.cat([self.cls.expand(z.shape[0], -1, -1), z + self.modality_embed], dim=1)
        pad = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)
        return self.layer(tokens, src_key_padding_mask=pad)[:, 0]


class FusionModel(nn.Module):
    def __init__(self, spec: dict[str, Any], fusion: str, width: int, text_encoder: str) -> None:
        super().__init__()
        f = spec["features"]
        text = f.get("text", {"vocab_size": 8, "pad_id": 0, "max_tokens": 8})
        self.image = conv_stack(3, width)
        self.audio = conv_stack(1, width)
        self.text = TextEncoder(text["vocab_size"], width, text_encoder, text["pad_id"], text["max_tokens"])
        self.proj = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(3)])
        self.fusion = Fusion(fusion, width)
        self.head = nn.Sequential(nn.Linear(self.fusion.out_dim, width), nn.GELU(), nn.Dropout(0.1),
                                  nn.Linear(width, max(1, len(spec["labels"]))))

    def forward(self, image: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        vectors = [self.image(image), self.audio(audio.unsqueeze(1)), self.text(text)]
        z = torch.stack([p(v) for p, v in zip(self.proj, vectors, strict=True)], dim=1)
        return self.head(self.fusion(z, present))


def modality_dropout(present: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop each present modality with probability p, never all of a sample's modalities."""
    if p <= 0:
        return present
    drop = torch.rand(present.shape, device=present.device, generator=generator) < p
    kept = present & ~drop
    empty = ~kept.any(dim=1)
    if empty.any():
        # restore one present modality (the first) for samples that lost all of them
        first = torch.argmax(present.int(), dim=1)
        kept[empty, first[empty]] = True
    return kept & present


class Preprocess(nn.Module):
    """On-device normalization (dataset.json statistics) and batched augmentation."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        f = spec["features"]
        image = f.get("image", {"mean": [0.0] * 3, "std": [1.0] * 3})
        audio = f.get("audio", {"mean": [0.0], "std": [1.0]})
        self.register_buffer("img_mean", torch.tensor(image["mean"]).view(1, 3, 1, 1))
        self.register_buffer("img_std", torch.tensor(image["std"]).view(1, 3, 1, 1))
        self.register_buffer("mel_mean", torch.tensor(audio["mean"]).view(1, -1, 1))
        self.register_buffer("mel_std", torch.tensor(audio["std"]).view(1, -1, 1))

    def forward(self, batch: dict[str, torch.Tensor], augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        image = (batch["image"].float() / 255.0 - self.img_mean) / self.img_std
        audio = (batch["audio"] - self.mel_mean) / self.mel_std
        if augment:
            image = random_resized_crop_flip(image)
            audio = spec_augment(audio)
        return image, audio


def random_resized_crop_flip(x: torch.Tensor, scale: tuple[float, float] = (0.75, 1.0)) -> torch.Tensor:
    """Per-sample random zoom/shift and horizontal flip in one batched affine resample."""
    n = x.shape[0]
    s = torch.empty(n, device=x.device).uniform_(math.sqrt(scale[0]), math.sqrt(scale[1]))
    tx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - s)
    ty = (torch.rand(n, device=x.device) * 2 - 1) * (1 - s)
    flip = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = s * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = s, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
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
