"""params.yaml → dataclasses: defaults, the shipped file, and one-line errors naming the key."""

from pathlib import Path

import pytest

from mmprep.config import ConfigError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_load_and_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.prepare.image.size == 64
    assert abs(sum(params.prepare.splits.values()) - 1) < 1e-9
    assert params.train.fusion in ("concat", "weighted_sum", "product", "attention")


def test_defaults_without_a_file():
    assert load_params(None).prepare.audio.sample_rate == 16000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prepare": {"imgae": {}}}, r"prepare\.imgae: unknown key"),
        ({"prepare": {"image": {"size": "big"}}}, r"prepare\.image\.size: expected int"),
        ({"prepare": {"splits": {"train": 0.5, "val": 0.1}}}, r"prepare\.splits: ratios must sum to 1"),
        ({"prepare": {"on_bad_modality": "ignore"}}, r"prepare\.on_bad_modality: 'ignore' is not one of reject, drop"),
        ({"prepare": {"label": {"rules": [{"pattern": "(", "label": "x"}]}}}, r"rules\[0\]\.pattern: invalid regex"),
        ({"train": {"fusion": "sum"}}, r"train\.fusion: 'sum' is not one of"),
        ({"train": []}, r"train: expected a mapping"),
        ({"train": {"width": 30}}, r"train\.width: must be a multiple of 4"),
        ({"train": {"log_every": 0}}, r"train\.log_every: must be >= 1"),
        ({"train": {"checkpoint_every": 0}}, r"train\.checkpoint_every: must be >= 1"),
        ({"train": {"grad_clip": 0}}, r"train\.grad_clip: must be > 0"),
        ({"train": {"warmup_steps": -5}}, r"train\.warmup_steps: must be >= 0"),
        ({"train": {"shuffle_buffer": -1}}, r"train\.shuffle_buffer: must be >= 0"),
    ],
)
def test_bad_params_fail_with_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        params_from_dict(data)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_files_layer_in_order_section_by_section(tmp_path):
    base = ROOT / "params.yaml"
    top = tmp_path / "top.yaml"
    top.write_text("prepare:\n  video:\n    size: 32\n  link_modalities: [video]\ntrain:\n  epochs: 3\n")
    p = load_params([base, top])
    shipped = load_params(base)
    assert (p.prepare.video.size, p.prepare.link_modalities, p.train.epochs) == (32, ("video",), 3)
    assert p.prepare.video.frames == shipped.prepare.video.frames and p.prepare.image == shipped.prepare.image  # kept from the base
    assert p.train.width == shipped.train.width
    video = load_params([base, ROOT / "params-video.yaml"])  # the video demo's layer
    assert video.demo_corpus.video == 1.0 and video.prepare.audio == shipped.prepare.audio
    with pytest.raises(ConfigError, match="prepare.video.size"):
        top.write_text("prepare:\n  video:\n    size: 2\n")
        load_params([base, top])
    top.write_text("prepare:\n  splits: {train: 0.9, test: 0.1}\n")  # a mapping-valued param is given whole, not merged
    assert load_params([base, top]).prepare.splits == {"train": 0.9, "test": 0.1}


@pytest.mark.parametrize("labels,message", [(["Cat", "cat"], r"'Cat' and 'cat' are the same label once normalized"),
                                            (["x", " "], r"' ' is empty once normalized"),
                                            (["x", "y\u200b", "y"], r"'y\\u200b' and 'y' are the same label")])
def test_fixed_labels_that_normalize_to_one_class_or_none_are_refused(labels, message):
    from mmprep.labels import check_fixed_labels

    with pytest.raises(ConfigError, match=message):
        check_fixed_labels(params_from_dict({"prepare": {"label": {"labels": labels}}}).prepare.label)
    with pytest.raises(ConfigError, match="has repeated labels"):
        params_from_dict({"prepare": {"label": {"labels": ["x", "x"]}}})
    check_fixed_labels(params_from_dict({"prepare": {"label": {"labels": ["Cat", "cat"], "case": "keep"}}}).prepare.label)
