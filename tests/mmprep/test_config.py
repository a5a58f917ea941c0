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
