"""SentencePiece tokenizer trained on the train split's text (a full-pass analyzer)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from mmprep.config import TextConfig

# With no train text at all we still ship a valid model: byte fallback covers any input.
FALLBACK_CORPUS = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,!?'\"-",)


def _train(sentences: list[str], cfg: TextConfig, vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=cfg.character_coverage,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max(4192, cfg.max_chars * 4),
        minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(texts: Iterable[str], cfg: TextConfig) -> bytes:
    """The serialized model proto, deterministic for a set of texts (sorted, deduplicated)."""
    sentences = sorted(set(t for t in texts if t.strip())) or list(FALLBACK_CORPUS)
    vocab = cfg.vocab_size
    for _ in range(4):
        try:
            return _train(sentences, cfg, vocab)
        except RuntimeError as err:  # tiny corpora: "Vocabulary size is smaller than required_chars…"
            found = re.search(r"(\d+)\D*$", str(err))
            needed = int(found.group(1)) if found else 0
            if needed <= vocab:
                raise
            vocab = needed + 1
    raise RuntimeError(f"could not train a tokenizer with vocab_size={cfg.vocab_size}")


class Tokenizer:
    """Encode text to int32 ids; pickles as its model bytes (Beam ships it to workers)."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)

    @classmethod
    def from_bytes(cls, model: bytes) -> Tokenizer:
        return cls(model)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    def encode(self, text: str, max_tokens: int) -> np.ndarray:
        ids = self._sp.encode(text, out_type=int)[:max_tokens]
        return np.asarray(ids, dtype=np.int32)

    def __getstate__(self) -> bytes:
        return self.model

    def __setstate__(self, state: bytes) -> None:
        self.__init__(state)
