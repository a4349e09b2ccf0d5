"""Hub round trips, all offline: local directories, a Hub cache built in tmp_path, a patched upload."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from errwrap import ErrorCorrectionWrapper
from errwrap.hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

from .tiny import batch, tiny_base


def _trained_like(seed: int = 0) -> ErrorCorrectionWrapper:
    """A wrapper whose heads differ from a fresh one (so a round trip is not trivially equal)."""
    wrap = ErrorCorrectionWrapper(tiny_base(seed=seed), fusion="learned")
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for p in wrap.head_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in wrap.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    return wrap.eval()


def _assert_same(a: ErrorCorrectionWrapper, b: ErrorCorrectionWrapper) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x, _ = batch()
    for ta, tb in zip(a.eval()(x), b.eval()(x), strict=False):
        assert torch.equal(ta, tb)


def test_custom_base_round_trip_needs_model(tmp_path):
    wrap = _trained_like()
    wrap.save_pretrained(tmp_path, class_names=[f"c{i}" for i in range(5)], training={"steps": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(config) >= {"errwrap_version", "format_version", "heads", "heads_only", "base", "class_names"}
    assert config["base"] is None and config["heads"]["num_classes"] == 5 and config["heads"]["fusion"] == "learned"
    with pytest.raises(ValueError, match="custom network .* model="):
        ErrorCorrectionWrapper.from_pretrained(tmp_path)
    # a fresh, differently initialised base: the full checkpoint restores its weights too
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base(seed=7))
    _assert_same(wrap, loaded)
    assert loaded.class_names == [f"c{i}" for i in range(5)]
    card = (tmp_path / CARD_NAME).read_text()
    assert "library_name: errwrap" in card and "Erroneous pixel prediction" in card and "steps: 3" in card


def test_heads_only_round_trip_keeps_callers_base(tmp_path):
    wrap = _trained_like()
    wrap.save_pretrained(tmp_path, heads_only=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("base.") for k in keys)
    with pytest.raises(ValueError, match="only the heads"):
        ErrorCorrectionWrapper.from_pretrained(tmp_path)
    other_base = tiny_base(seed=7)
    before = {k: v.clone() for k, v in other_base.state_dict().items()}
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=other_base)
    for k, v in loaded.base.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in wrap.state_dict().items():
        if not k.startswith("base."):
            assert torch.equal(v, loaded.state_dict()[k])


def test_dtype_and_device_are_the_callers_choice(tmp_path):
    _trained_like().save_pretrained(tmp_path)
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=tiny_base(), dtype=torch.bfloat16, device="cpu")
    assert loaded.error_head.classifier.weight.dtype == torch.bfloat16
    assert loaded.base.classifier.weight.dtype == torch.bfloat16
    assert loaded.error_head.blocks[0].norm.num_batches_tracked.dtype == torch.int64


def _fake_hub_cache(tmp_path: Path, saved: Path, repo: str = "org/name") -> Path:
    hub = tmp_path / "hf" / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in saved.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (hub / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (hub / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(rev)
    return hub


def test_load_by_repo_id_from_hub_cache(tmp_path):
    saved = tmp_path / "saved"
    wrap = _trained_like()
    wrap.save_pretrained(saved)
    hub = _fake_hub_cache(tmp_path, saved)
    loaded = ErrorCorrectionWrapper.from_pretrained(
        "org/name", model=tiny_base(seed=3), cache_dir=hub, local_files_only=True
    )
    _assert_same(wrap, loaded)
    with pytest.raises(FileNotFoundError, match="org/other"):
        ErrorCorrectionWrapper.from_pretrained("org/other", model=tiny_base(), cache_dir=hub, local_files_only=True)


@pytest.mark.slow
def test_load_by_repo_id_with_hf_home_offline(tmp_path):
    """The real download path with HF_HOME and HF_HUB_OFFLINE=1, in a fresh interpreter."""
    saved = tmp_path / "saved"
    wrap = _trained_like()
    wrap.save_pretrained(saved)
    _fake_hub_cache(tmp_path, saved)
    x, _ = batch()
    torch.save(wrap(x).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from errwrap import ErrorCorrectionWrapper
        from tests.tiny import batch, tiny_base
        wrap = ErrorCorrectionWrapper.from_pretrained("org/name", model=tiny_base(seed=5)).eval()
        x, _ = batch()
        assert torch.equal(wrap(x).logits, torch.load({str(tmp_path / 'expected.pt')!r}))
        print("loaded-ok")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded-ok" in result.stdout


def test_push_to_hub_sends_the_saved_files(monkeypatch):
    import huggingface_hub

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, {p.name: p.read_bytes() for p in folder.iterdir()}, kwargs)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    wrap = _trained_like()
    assert (
        wrap.push_to_hub(
            "org/name",
            heads_only=True,
            private=True,
            metrics={"base": {"miou": 0.5}, "fused": {"miou": 0.6}, "num_images": 3},
        )
        == "commit-info"
    )
    assert calls["create"] == ("org/name", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo, files, kwargs = calls["upload"]
    assert repo == "org/name" and set(files) == {CONFIG_NAME, WEIGHTS_NAME, CARD_NAME}
    assert json.loads(files[CONFIG_NAME])["heads_only"] is True
    assert "| fused | 0.6000 |" in files[CARD_NAME].decode()
    assert kwargs["repo_type"] == "model"


# ---------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    _trained_like().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def test_missing_files_are_named(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(new_feature=1), r"unknown keys \['new_feature'\]"),
        (lambda c: c["heads"].update(attention=True), r"heads\.\['attention'\]"),
        (lambda c: c.update(format_version=99), "Upgrade errwrap"),
        (lambda c: c.update(base={"family": "torchvision", "config": {"auto_map": "evil.module.Class"}}), "auto_map"),
        (lambda c: c["heads"].update(num_classes="5"), "heads.num_classes must be a positive integer"),
        (lambda c: c.update(class_names=["a"]), "1 class_names for num_classes=5"),
        (lambda c: c.pop("format_version"), "format_version"),
    ],
)
def test_invalid_configs_are_refused_by_key(saved, edit, match):
    _edit_config(saved, edit)
    with pytest.raises(ValueError, match=match):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_config_that_is_not_json(saved):
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_shape_mismatch_names_keys_and_loads_nothing(saved):
    other = tiny_base(num_classes=7)
    with pytest.raises(ValueError, match="num_classes=5"):
        ErrorCorrectionWrapper.from_pretrained(saved, model=other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["error_head.classifier.weight"] = torch.zeros(1, 3, 1, 1)
    del tensors["detail_head.classifier.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(saved / WEIGHTS_NAME))
    base = tiny_base(seed=9)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError) as info:
        ErrorCorrectionWrapper.from_pretrained(saved, model=base)
    message = str(info.value)
    assert "detail_head.classifier.bias" in message and "extra.weight" in message
    assert "error_head.classifier.weight: expected (1, 64, 1, 1), got (1, 3, 1, 1)" in message
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), "a failed load changed the caller's base"


def test_truncated_and_corrupt_weights(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    for bad in (data[:4], data[: len(data) // 2], b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:]):
        (saved / WEIGHTS_NAME).write_bytes(bad)
        with pytest.raises(ValueError, match=WEIGHTS_NAME):
            ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_save_is_atomic_when_interrupted(saved, monkeypatch):
    import errwrap._io as io

    before = (saved / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _trained_like(seed=4).save_pretrained(saved)
    assert (saved / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in saved.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_non_json_configuration_cannot_be_saved(tmp_path):
    from torch import nn

    wrap = ErrorCorrectionWrapper(tiny_base(), norm_layer=lambda c: nn.BatchNorm2d(c))
    with pytest.raises(TypeError, match="not plain JSON"):
        wrap.save_pretrained(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()


def test_loaded_wrapper_is_in_eval_mode_and_keeps_its_sample_size(tmp_path):
    class NeedsBig(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = tiny_base()

        def forward(self, x):
            if x.shape[-1] < 100:
                raise RuntimeError("input too small")
            return self.base(x)

    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(NeedsBig(), sample_size=128)
    wrap.save_pretrained(tmp_path)
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path, model=NeedsBig())
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert loaded.head_config["sample_size"] == 128
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["heads"]["sample_size"] == 128
    tiny = tmp_path / "default"
    ErrorCorrectionWrapper(tiny_base()).save_pretrained(tiny)  # the default is not written: older errwrap reads it
    assert "sample_size" not in json.loads((tiny / CONFIG_NAME).read_text())["heads"]
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, wrap.eval()(x).logits)
