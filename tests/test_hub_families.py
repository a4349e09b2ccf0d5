"""Hub round trips for every family errwrap can rebuild from config.json, and for a hooked base."""

import json

import pytest
import torch

from errwrap import ErrorCorrectionWrapper
from errwrap.hub import CONFIG_NAME

from .test_adapters import _plain, _segformer, _smp, _tv
from .test_hub import _assert_same


def _deeplab():
    from errwrap.models import DeepLabV3Plus

    torch.manual_seed(0)
    return DeepLabV3Plus("resnet18", num_classes=5, aspp_channels=16, decoder_channels=16, low_level_channels=8).eval()


def _perturb_heads(wrap):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in wrap.head_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return wrap.eval()


FAMILIES = {
    "errwrap.DeepLabV3Plus": _deeplab,
    "smp": lambda: _smp("unet", encoder_depth=3, decoder_channels=(16, 8, 8)),
    "torchvision": lambda: _tv("lraspp_mobilenet_v3_large"),
    "transformers": _segformer,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_rebuilds_the_base_from_config(family, tmp_path):
    wrap = _perturb_heads(ErrorCorrectionWrapper(FAMILIES[family](), error_channels=8, detail_channels=8))
    wrap.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["base"]["family"] == family
    assert set(config["heads"]) >= {"num_classes", "low_level", "high_level", "error_channels", "fusion"}
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path)  # no user code: rebuilt from the spec
    assert type(loaded.base) is type(wrap.base)
    assert loaded.adapter.name == wrap.adapter.name
    _assert_same(wrap, loaded)


def test_round_trip_of_a_hooked_custom_base(tmp_path):
    model = _plain("tensor")
    wrap = _perturb_heads(
        ErrorCorrectionWrapper(model, low_level="backbone.0", high_level="decoder", error_channels=8, detail_channels=8)
    )
    wrap.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["base"] is None and config["heads"]["adapter"] == "hooks"
    with pytest.raises(ValueError, match="model="):
        ErrorCorrectionWrapper.from_pretrained(tmp_path)
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=_plain("tensor", seed=3))
    assert loaded.adapter.name == "hooks"
    _assert_same(wrap, loaded)


@pytest.mark.parametrize(
    "base, match",
    [
        ({"family": "os.system", "config": {}}, "os.system"),
        (
            {
                "family": "errwrap.DeepLabV3Plus",
                "config": {"encoder_name": "resnet18", "num_classes": 5, "__init__": "x"},
            },
            "__init__",
        ),
        ({"family": "torchvision", "config": {"name": "torch.hub.load", "num_classes": 5}}, "torch.hub.load"),
        ({"family": "smp", "config": {"arch": "builtins.eval", "classes": 5}}, "builtins.eval"),
        ({"family": "transformers", "class": "transformers.AutoModel", "config": {}}, "transformers.AutoModel"),
    ],
)
def test_base_spec_with_unknown_family_or_import_path_is_refused(tmp_path, base, match):
    wrap = ErrorCorrectionWrapper(_deeplab(), error_channels=8, detail_channels=8)
    wrap.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["base"] = base
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        ErrorCorrectionWrapper.from_pretrained(tmp_path)
