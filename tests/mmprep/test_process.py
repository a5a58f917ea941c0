"""process_row: the one function the pipeline and `mmprep predict` share."""

import cv2
import numpy as np

from mmprep.config import LabelConfig, LabelRule, PrepareConfig
from mmprep.process import process_row
from mmprep.records import RawRow, RecordError, Reject, Sample


def png() -> bytes:
    img = np.full((40, 40, 3), 90, np.uint8)
    cv2.circle(img, (20, 20), 10, (255, 255, 255), -1)
    return cv2.imencode(".png", img)[1].tobytes()


ROW = RawRow(source="m.jsonl:1", order=0, id="x", image="x.png", text="A RED ball &amp; more")


def test_a_bad_modality_rejects_the_row_or_is_dropped_per_policy():
    loaded = {"image": b"<html>", "text": ROW.text}
    rejected = process_row(ROW, loaded, PrepareConfig())
    assert isinstance(rejected, Reject) and rejected.reason == "image_undecodable" and rejected.stage == "image"
    kept = process_row(ROW, loaded, PrepareConfig(on_bad_modality="drop"))
    assert isinstance(kept, Sample) and kept.jpg is None and kept.text == "A RED ball & more"
    assert kept.meta["dropped"] == {"image": "image_undecodable"}
    nothing = process_row(ROW, {"image": b"<html>", "text": "   "}, PrepareConfig(on_bad_modality="drop"))
    assert nothing.reason == "no_usable_modality"


def test_loader_errors_and_weak_labels():
    missing = process_row(ROW, {"image": RecordError("missing_file", "x.png"), "text": ROW.text}, PrepareConfig())
    assert missing.reason == "missing_file"
    cfg = PrepareConfig(label=LabelConfig(rules=(LabelRule(pattern=r"\bred\b", label="Red"),)))
    sample = process_row(ROW, {"image": png(), "text": ROW.text}, cfg)
    assert (sample.label, sample.meta["label_source"]) == ("red", "rule")
    assert sample.meta["image"]["width"] == 40 and len(sample.meta["image"]["sha256"]) == 64
    assert sample.key.startswith("x-") and sample.hashes.keys() == {"image", "text", "text_link"}
