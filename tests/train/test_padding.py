"""A sample's prediction does not depend on the batch it is in: the loader pads texts to the
batch's longest, and `mmprep predict` (a batch of one) must score as `mmprep evaluate` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.model import TextEncoder


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_a_texts_vector_does_not_depend_on_the_pads_after_it(kind):
    torch.manual_seed(0)
    enc = TextEncoder(50, 32, kind, pad_id=0, max_len=32).eval()
    alone = torch.tensor([[5, 6, 7, 8]])
    batch = torch.tensor([[5, 6, 7, 8] + [0] * 20, list(range(3, 27))])  # padded to a longer neighbour
    with torch.no_grad():
        a, b = enc(alone), enc(batch)
    assert torch.allclose(a[0], b[0], atol=1e-5), float((a[0] - b[0]).abs().max())
    assert torch.isfinite(b).all()


def test_the_gru_text_encoder_takes_an_empty_batch_and_rows_of_pads():
    enc = TextEncoder(50, 32, "gru", pad_id=0, max_len=8)
    assert enc(torch.zeros((0, 8), dtype=torch.long)).shape == (0, 32)
    out = enc(torch.tensor([[0] * 8, [4, 5] + [0] * 6]))
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(32))
    out.sum().backward()  # every GRU parameter gets a gradient (DDP needs them in the graph)
    assert all(p.grad is not None for p in enc.body.parameters())


SPEC = {"features": {"audio": {"bins": 16}, "text": {"vocab_size": 50, "pad_id": 0, "max_tokens": 8}}, "labels": list("abc")}


@pytest.mark.parametrize("alone_frames", [1, 7, 20, 33])
def test_a_variable_length_spectrograms_vector_does_not_depend_on_its_batch(alone_frames):
    """audio.clip_seconds: 0 keeps each clip's length; the loader pads a batch to its longest. A
    clip must score the same alone (`mmprep predict`) as beside a longer one (`mmprep evaluate`,
    whatever evaluate.batch_size is)."""
    from train.data import Shapes, collate
    from train.model import FusionModel

    torch.manual_seed(0)
    model = FusionModel(SPEC, "concat", 32, "gru").eval()
    for module in model.modules():  # BatchNorm statistics of a trained model, not 0/1
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    g = np.random.default_rng(alone_frames)
    clip = g.normal(size=(16, alone_frames)).astype(np.float32)
    shapes = Shapes(image_size=1, bins=16, frames=None, max_tokens=8, pad_id=0, video_frames=1, video_size=1)
    rows = [{"audio": clip, "label": 0}, {"audio": g.normal(size=(16, 61)).astype(np.float32), "label": 1},
            {"text": np.array([3, 4]), "label": 2}]
    with torch.no_grad():
        scores = []
        for samples in (rows[:1], rows):
            b = collate(samples, shapes)
            assert b["audio_frames"].tolist()[: len(samples)] == [alone_frames, 61, 1][: len(samples)]
            audio = b["audio"] - 0.5  # normalized: the pads are no longer 0
            scores.append(model(b["image"].float(), audio, b["text"], b["video"].float(), b["present"],
                                audio_frames=b["audio_frames"])[0])
    assert torch.allclose(scores[0], scores[1], atol=1e-5), float((scores[0] - scores[1]).abs().max())
