"""errwrap.config.HeadConfig: the one schema of the heads' configuration (config.json's "heads")."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from errwrap import ErrorCorrectionWrapper
from errwrap.config import MAX_HEAD_PARAMETERS, HeadConfig, head_parameter_count
from errwrap.hub import CONFIG_NAME, read_config

from .tiny import tiny_base

SAVED_V1 = Path(__file__).parent / "data" / "saved_model_v1"

REQUIRED = dict(
    num_classes=5, in_channels=3, low_level="0", high_level="2", error_channels=8, error_blocks=2,
    detail_channels=8, detail_blocks=2, fusion="mixture", norm_layer="batchnorm", act_layer="relu", error_prior=0.1,
)  # fmt: skip
#: A value other than the default for every field.
EVERY_FIELD = dict(
    num_classes=7, in_channels=4, low_level="stem", high_level="layer4", low_channels=24, high_channels=96,
    error_channels=32, error_blocks=3, detail_channels=16, detail_blocks=1, fusion="learned", norm_layer="groupnorm",
    act_layer="gelu", error_prior=0.25, adapter="hooks", sample_size=128, temperature=2.5, project_features=True,
    fuse_at_features=True,
)  # fmt: skip


def test_every_field_round_trips_through_json():
    assert {f.name for f in dataclasses.fields(HeadConfig)} == set(EVERY_FIELD)
    config = HeadConfig(**EVERY_FIELD)
    data = json.loads(json.dumps(config.to_json()))
    assert data == EVERY_FIELD and list(data) == [f.name for f in dataclasses.fields(HeadConfig)]
    assert HeadConfig.from_json(data, "x.json") == config


def test_defaults_are_left_out_and_read_back():
    config = HeadConfig(**REQUIRED)
    assert config.to_json() == REQUIRED  # no sample_size, temperature, channels or adapter at their defaults
    back = HeadConfig.from_json(REQUIRED, "x.json")
    assert back == config and back.sample_size == 64 and back.temperature == 1.0 and back.low_channels is None
    assert HeadConfig(**REQUIRED, sample_size=64, temperature=1.0).to_json() == REQUIRED


def test_config_is_frozen_and_an_integer_temperature_reads_as_a_float():
    config = HeadConfig(**REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_classes = 3  # type: ignore[misc]
    back = HeadConfig.from_json({**REQUIRED, "temperature": 2}, "x.json")
    assert back.temperature == 2.0 and isinstance(back.temperature, float)


def test_constructor_kwargs_are_what_the_wrapper_takes():
    kwargs = HeadConfig(**EVERY_FIELD).constructor_kwargs()
    assert set(kwargs) == set(REQUIRED) | {"sample_size", "project_features", "fuse_at_features"}
    assert kwargs["sample_size"] == 128 and kwargs["fusion"] == "learned"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("num_classes", "5", r"heads\.num_classes must be a positive integer, got '5'"),
        ("num_classes", True, r"heads\.num_classes must be a positive integer, got True"),
        ("in_channels", 0, r"heads\.in_channels must be a positive integer, got 0"),
        ("in_channels", 2000, r"heads\.in_channels=2000 is larger than errwrap allows \(1024\)"),
        ("low_channels", -1, r"heads\.low_channels must be a positive integer"),
        ("high_channels", 1.5, r"heads\.high_channels must be a positive integer"),
        ("error_channels", 100_000, r"heads\.error_channels=100000 is larger than errwrap allows \(4096\)"),
        ("error_blocks", 65, r"heads\.error_blocks=65 is larger than errwrap allows \(64\)"),
        ("detail_channels", None, r"heads\.detail_channels must be a positive integer, got None"),
        ("detail_blocks", "2", r"heads\.detail_blocks must be a positive integer"),
        ("sample_size", 4096, r"heads\.sample_size=4096 is larger than errwrap allows \(2048\)"),
        ("low_level", 0, r"heads\.low_level must be a string, got 0"),
        ("high_level", None, r"heads\.high_level must be a string"),
        ("fusion", ["mixture"], r"heads\.fusion must be a string"),
        ("norm_layer", 1, r"heads\.norm_layer must be a string"),
        ("act_layer", {}, r"heads\.act_layer must be a string"),
        ("adapter", 3, r"heads\.adapter must be a string"),
        ("error_prior", 1.0, r"heads\.error_prior must be a probability in \(0, 1\), got 1\.0"),
        ("error_prior", "0.1", r"heads\.error_prior must be a probability"),
        ("temperature", 1e-300, r"heads\.temperature must be a positive number in \[0\.001, 1000\]"),
        ("temperature", True, r"heads\.temperature must be a positive number"),
        ("project_features", 1, r"heads\.project_features must be true or false, got 1"),
        ("project_features", "true", r"heads\.project_features must be true or false"),
        ("fuse_at_features", 0, r"heads\.fuse_at_features must be true or false, got 0"),
    ],
)
def test_each_bad_field_is_refused_by_name(key, value, match):
    with pytest.raises(ValueError, match=r"^x\.json: " + match):
        HeadConfig.from_json({**REQUIRED, key: value}, "x.json")


def test_every_field_has_a_check():
    for f in dataclasses.fields(HeadConfig):
        assert f.metadata["check"](object()) is not None, f.name  # not a valid value of any field
        assert f.metadata["check"](EVERY_FIELD[f.name]) is None, f.name


def test_unknown_missing_and_non_object_heads_are_refused():
    with pytest.raises(ValueError, match=r"unknown keys heads\.\['attention'\]; expected \['act_layer', "):
        HeadConfig.from_json({**REQUIRED, "attention": True}, "x.json")
    with pytest.raises(ValueError, match=r"missing keys heads\.\['error_prior', 'fusion'\]"):
        HeadConfig.from_json({k: v for k, v in REQUIRED.items() if k not in ("fusion", "error_prior")}, "x.json")
    with pytest.raises(ValueError, match="'heads' must be a JSON object"):
        HeadConfig.from_json([REQUIRED], "x.json")


def test_heads_too_large_are_refused_as_a_whole():
    big = {**REQUIRED, "error_channels": 4096, "error_blocks": 64}  # each allowed, together about 9.7 G parameters
    assert head_parameter_count(HeadConfig(**big)) > MAX_HEAD_PARAMETERS
    with pytest.raises(ValueError, match="M parameters, more than errwrap allows"):
        HeadConfig.from_json(big, "x.json")


def test_wrapper_reads_its_attributes_from_the_config():
    wrap = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8, sample_size=48)
    config = wrap.config
    assert (wrap.num_classes, wrap.in_channels, wrap.low_key, wrap.high_key) == (5, 3, "0", "2")
    assert (config.num_classes, config.in_channels, config.low_level, config.high_level) == (5, 3, "0", "2")
    assert (config.low_channels, config.high_channels, config.adapter, config.sample_size) == (8, 16, "native", 48)
    assert wrap.head_config == {k: v for k, v in dataclasses.asdict(config).items() if k != "temperature"}
    wrap.temperature = 2
    assert wrap.config.temperature == 2.0 and wrap.temperature == 2.0 and wrap.config is not config
    assert config.temperature == 1.0  # the old config is not changed: it is frozen


def test_saved_config_of_the_first_format_reads_through_the_schema():
    config = read_config(SAVED_V1 / CONFIG_NAME)
    raw = json.loads((SAVED_V1 / CONFIG_NAME).read_text())
    assert config.heads.to_json() == raw["heads"]
    assert config.heads == HeadConfig(**REQUIRED, low_channels=8, high_channels=16, adapter="native")
    assert config.base is None and not config.heads_only and config.class_names == [f"class{i}" for i in range(5)]


def test_written_config_is_the_first_formats_but_for_adapter_options(tmp_path):
    """What save_pretrained writes for the saved_model_v1 settings: the same heads, same keys in
    the same order, without the empty "adapter_options" (errwrap of format 1 reads it absent)."""
    wrap = ErrorCorrectionWrapper(tiny_base(0), error_channels=8, detail_channels=8, project_features=False)
    wrap.save_pretrained(tmp_path, class_names=[f"class{i}" for i in range(5)])
    old = json.loads((SAVED_V1 / CONFIG_NAME).read_text())
    assert old.pop("adapter_options") == {}
    new = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert list(new) == list(old) and list(new["heads"]) == list(old["heads"])
    new.pop("errwrap_version"), old.pop("errwrap_version")
    assert new == old


@pytest.mark.parametrize(
    "options, ok", [({}, True), (None, True), ("absent", True), ({"freeze_base": False}, False), ([], False)]
)
def test_adapter_options_read_only_when_empty(tmp_path, options, ok):
    raw = json.loads((SAVED_V1 / CONFIG_NAME).read_text())
    if options == "absent":
        del raw["adapter_options"]
    else:
        raw["adapter_options"] = options
    (tmp_path / CONFIG_NAME).write_text(json.dumps(raw))
    if ok:
        assert read_config(tmp_path / CONFIG_NAME).heads.num_classes == 5
    else:
        with pytest.raises(ValueError, match=r"adapter_options .* are not allowed in a saved config"):
            read_config(tmp_path / CONFIG_NAME)


def test_projected_heads_are_the_default_and_saved_as_such(tmp_path):
    """New wrappers reduce each head's feature with a 1x1 conv first; the config says so, and a
    config without the key (every model saved before it) rebuilds the unprojected heads."""
    wrap = ErrorCorrectionWrapper(tiny_base(0), error_channels=8, detail_channels=8)
    assert wrap.config.project_features is True and wrap.config.fuse_at_features is False
    assert wrap.error_head.project is not None and wrap.detail_head.project is not None
    assert wrap.error_head.blocks[0].conv.in_channels == 8 + 5 + 3  # width + classes + cues, not 16 + 5 + 3
    assert wrap.detail_head.blocks[0].conv.in_channels == 8 + 8 + 1
    wrap.save_pretrained(tmp_path)
    heads = json.loads((tmp_path / CONFIG_NAME).read_text())["heads"]
    assert heads["project_features"] is True and "fuse_at_features" not in heads  # at its default: left out
    assert read_config(tmp_path / CONFIG_NAME).heads.project_features is True
    old = read_config(SAVED_V1 / CONFIG_NAME).heads
    assert old.project_features is False and old.fuse_at_features is False
    assert ErrorCorrectionWrapper(tiny_base(0), **old.constructor_kwargs()).error_head.project is None


def test_fusion_at_features_is_saved_and_gives_the_same_outputs_after_loading(tmp_path):
    wrap = ErrorCorrectionWrapper(tiny_base(0), error_channels=8, detail_channels=8, fuse_at_features=True).eval()
    wrap.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["heads"]["fuse_at_features"] is True
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base(0)).eval()
    assert loaded.config.fuse_at_features is True
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), pytest.warns(UserWarning, match="freshly initialised"):
        expected = wrap(images)
    with torch.no_grad():
        got = loaded(images)
    for name in expected._fields:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("project", [False, True])
def test_head_parameter_count_counts_the_conv_weights(project):
    wrap = ErrorCorrectionWrapper(tiny_base(0), error_channels=8, detail_channels=8, project_features=project)
    heads = [wrap.error_head, wrap.detail_head]
    weights = sum(m.weight.numel() for h in heads for m in h.modules() if isinstance(m, torch.nn.Conv2d))
    refine = wrap.error_head.refine.weight.numel() + wrap.error_head.classifier.weight.numel()
    assert head_parameter_count(wrap.config) == weights - refine
