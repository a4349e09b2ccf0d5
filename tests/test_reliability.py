"""Hostile files, bad values and faults through the public API and CLI (issue 18, docs/robustness.md)."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from errwrap import ErrorCorrectionWrapper
from errwrap.hub import CONFIG_NAME, WEIGHTS_NAME

from .tiny import batch, tiny_base


def _small_wrapper(seed: int = 0) -> ErrorCorrectionWrapper:
    return ErrorCorrectionWrapper(tiny_base(seed), error_channels=8, detail_channels=8).eval()


@pytest.fixture
def saved(tmp_path):
    _small_wrapper().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


# ---------------------------------------------------------------------- 1. the base-rebuild table
def _deeplab_spec(name):
    return {"family": "errwrap.DeepLabV3Plus", "config": {"encoder_name": name, "num_classes": 5}}


OUTSIDE_NAMES = [
    "hf-hub:timm/resnet18.a1_in1k",
    "hf_hub:timm/resnet18",
    "local-dir:/tmp",
    "timm/resnet18",
    "../resnet18",
    "a\\b",
    "resnet18/x",
    "https://example.com/r18",
]


@pytest.mark.parametrize("name", OUTSIDE_NAMES)
def test_deeplab_encoder_names_that_reach_outside_are_refused_before_timm(name, monkeypatch):
    import timm

    from errwrap.adapters.specs import build_base

    calls = []
    monkeypatch.setattr(
        timm, "create_model", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("timm reached"))
    )
    with pytest.raises(ValueError, match=r"encoder_name"):
        build_base(_deeplab_spec(name))
    assert calls == []


def test_unknown_timm_encoder_name_is_refused_with_the_name():
    from errwrap.adapters.specs import build_base

    with pytest.raises(ValueError, match=r"encoder_name 'no_such_encoder_xyz'.*timm"):
        build_base(_deeplab_spec("no_such_encoder_xyz"))


def test_local_dir_config_is_not_read_through_a_saved_model(saved, tmp_path, monkeypatch):
    """The reported escape: a config.json naming ``local-dir:PATH`` made timm read PATH."""
    import timm

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 5}))
    _edit_config(saved, lambda c: c.update(base=_deeplab_spec(f"local-dir:{outside}")))
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="local-dir"):
        ErrorCorrectionWrapper.from_pretrained(saved)
    assert calls == []


@pytest.mark.parametrize(
    "config, match",
    [
        ({"arch": "unet", "encoder_name": "tu-hf-hub:timm/resnet18", "classes": 5}, "encoder_name"),
        ({"arch": "unet", "encoder_name": "tu-local-dir:/tmp", "classes": 5}, "encoder_name"),
        ({"arch": "unet", "encoder_name": "../resnet18", "classes": 5}, "encoder_name"),
        ({"arch": "unet", "encoder_name": "no_such_encoder_xyz", "classes": 5}, "encoder_name"),
        ({"arch": "unet", "encoder_name": "resnet18", "classes": 5, "aux_params": {"x": "hf-hub:a/b"}}, "hf-hub"),
    ],
)
def test_smp_names_that_reach_outside_are_refused(config, match):
    pytest.importorskip("segmentation_models_pytorch")
    from errwrap.adapters.specs import build_base

    with pytest.raises(ValueError, match=match):
        build_base({"family": "smp", "config": config})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"backbone": "microsoft/resnet-50", "use_timm_backbone": False}, "backbone"),
        ({"backbone": "resnet50", "use_timm_backbone": False}, "backbone"),
        ({"backbone": "hf-hub:timm/resnet18", "use_timm_backbone": True}, "backbone"),
        ({"backbone": "local-dir:/tmp", "use_timm_backbone": True}, "backbone"),
        ({"backbone": "no_such_encoder_xyz", "use_timm_backbone": True}, "backbone"),
    ],
)
def test_transformers_backbone_names_are_refused_before_transformers(values, match):
    pytest.importorskip("transformers")
    from errwrap.adapters.specs import build_base

    with pytest.raises(ValueError, match=match):
        build_base(
            {
                "family": "transformers",
                "class": "UperNetForSemanticSegmentation",
                "config": {"backbone_config": None, **values},
            }
        )


def test_plain_known_names_still_build():
    from errwrap.adapters.specs import build_base

    spec = {
        "family": "errwrap.DeepLabV3Plus",
        "config": {
            "encoder_name": "resnet18",
            "num_classes": 3,
            "aspp_channels": 8,
            "decoder_channels": 8,
            "low_level_channels": 8,
        },
    }
    assert type(build_base(spec)).__name__ == "DeepLabV3Plus"


# ---------------------------------------------------------------------- 2. adapter_options
def test_adapter_options_from_a_file_are_refused_by_name(saved):
    _edit_config(saved, lambda c: c.update(adapter_options={"freeze_base": False}))
    with pytest.raises(ValueError, match=r"adapter_options.*freeze_base"):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


@pytest.mark.parametrize("options", [{}, None, "absent"])
def test_empty_or_absent_adapter_options_load_with_the_base_frozen(saved, options):
    _edit_config(
        saved, lambda c: c.pop("adapter_options", None) if options == "absent" else c.update(adapter_options=options)
    )
    loaded = ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())
    assert loaded.base_frozen
    assert not any(p.requires_grad for p in loaded.base.parameters())


# ---------------------------------------------------------------------- 3. bounds and NaN outputs
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["heads"].update(temperature=1e-300), "heads.temperature"),
        (lambda c: c["heads"].update(temperature=1e6), "heads.temperature"),
        (lambda c: c["heads"].update(error_channels=100_000), "heads.error_channels"),
        (lambda c: c["heads"].update(detail_channels=5000), "heads.detail_channels"),
        (lambda c: c["heads"].update(error_blocks=65), "heads.error_blocks"),
        (lambda c: c["heads"].update(sample_size=5000), "heads.sample_size"),
        (lambda c: c["heads"].update(num_classes=70_000), "heads.num_classes"),
        (lambda c: c["heads"].update(in_channels=10_000), "heads.in_channels"),
        (lambda c: c["heads"].update(error_prior=float("nan")), "heads.error_prior"),
        (lambda c: c.update(preprocessing={"mean": [0.5, float("nan"), 0.5], "std": [1, 1, 1]}), "preprocessing"),
        (lambda c: c.update(preprocessing={"mean": [0.5, 0.5, 0.5], "std": [1, 0, 1]}), "preprocessing"),
        (lambda c: c.update(preprocessing={"mean": [0.5, 0.5, 0.5], "std": [1, -1, 1]}), "preprocessing"),
        (lambda c: c.update(preprocessing={"mean": [0.5, 0.5, float("inf")], "std": [1, 1, 1]}), "preprocessing"),
    ],
)
def test_out_of_bound_config_values_are_refused_by_key(saved, edit, match):
    _edit_config(saved, edit)
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


@pytest.mark.parametrize("temperature", [1e-3, 0.5, 1000.0])
def test_temperatures_in_range_load(saved, temperature):
    _edit_config(saved, lambda c: c["heads"].update(temperature=temperature))
    assert ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base()).temperature == temperature


def _nan_wrapper() -> ErrorCorrectionWrapper:
    wrap = _small_wrapper()
    with torch.no_grad():
        wrap.base.classifier.bias[0] = float("nan")
    return wrap


def test_evaluate_refuses_nan_outputs_naming_pixels_and_images():
    from errwrap import evaluate

    x, y = batch()
    with pytest.raises(ValueError, match=r"batch 0.*NaN/Inf.*pixels.*images \[0, 1\]"):
        evaluate(_nan_wrapper(), [(x, y)], baselines=())


def test_calibrate_temperature_refuses_nan_logits_and_keeps_the_temperature():
    from errwrap import calibrate_temperature

    wrap = _nan_wrapper()
    wrap.temperature = 1.5
    with pytest.raises(ValueError, match="NaN/Inf"):
        calibrate_temperature(wrap, [batch()])
    assert wrap.temperature == 1.5


def test_fit_temperature_refuses_non_finite_log_probs():
    from errwrap.calibration import fit_temperature

    lp = torch.log_softmax(torch.randn(10, 3), 1)
    lp[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        fit_temperature(lp, torch.zeros(10, dtype=torch.long))


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    """A CLI-loadable model with finite weights whose heads overflow to Inf/NaN."""
    from errwrap.models import DeepLabV3Plus

    torch.manual_seed(0)
    base = DeepLabV3Plus("resnet18", num_classes=11, aspp_channels=8, decoder_channels=8, low_level_channels=8)
    wrap = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8)
    with torch.no_grad():
        wrap.detail_head.classifier.weight.fill_(3e38)
    wrap.preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = tmp_path_factory.mktemp("nan_model")
    wrap.save_pretrained(path)
    return path


def test_cli_predict_and_evaluate_refuse_nan_outputs(nan_model_dir, tmp_path, capsys):
    import re

    import numpy as np
    from PIL import Image

    from errwrap.cli import main

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--model", str(nan_model_dir), str(image), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        re.search(r"a\.png: the model's outputs hold NaN/Inf \(.*\) at [1-9]\d* pixels of images \[0\]", err)
        and "Traceback" not in err
    ), err
    assert not (tmp_path / "out" / "a_labels.png").exists()
    assert (
        main(["evaluate", "--model", str(nan_model_dir), "--data", "scenes:2", "--size", "32", "--batch-size", "2"])
        == 2
    )
    err = capsys.readouterr().err
    assert "batch 0" in err and "NaN/Inf" in err and "images [0, 1]" in err


# ---------------------------------------------------------------------- 4. all-or-nothing loads
def _scenes_wrapper(seed: int = 0, channels: int = 8) -> ErrorCorrectionWrapper:
    from errwrap.data import Scenes

    torch.manual_seed(seed)
    return ErrorCorrectionWrapper(
        tiny_base(seed, num_classes=len(Scenes.class_names)), error_channels=channels, detail_channels=8
    )


def _scenes_loader(n: int = 8, batch_size: int = 2):
    from errwrap.data import Scenes, make_loader

    return make_loader(Scenes(n, size=32, seed=0, cache=True), batch_size, seed=0)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before: dict) -> None:
    after = module.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed load"


def test_resume_into_a_different_model_changes_nothing(tmp_path):
    from errwrap import finetune

    finetune(_scenes_wrapper(), _scenes_loader(), steps=1, checkpoint_dir=tmp_path, log_every=None)
    other = _scenes_wrapper(seed=3, channels=16)  # the error head differs in shape, the detail head does not
    before = _state(other)
    with pytest.raises(ValueError, match=r"error_head.*expected .*16.*got .*8.*nothing was loaded"):
        finetune(other, _scenes_loader(), steps=2, checkpoint_dir=tmp_path, resume="latest", log_every=None)
    _assert_unchanged(other, before)


def test_load_checkpoint_weights_is_all_or_nothing(tmp_path):
    from errwrap.training import load_checkpoint_weights

    _scenes_wrapper().save_pretrained(tmp_path)  # a model.safetensors of the same key names
    other = _scenes_wrapper(seed=2, channels=16)
    before = _state(other)
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint_weights(other, tmp_path)
    _assert_unchanged(other, before)


def test_from_pretrained_into_a_passed_base_is_all_or_nothing(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["base.stem.0.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(tensors, str(saved / WEIGHTS_NAME))
    base = tiny_base(seed=5)
    before = _state(base)
    with pytest.raises(ValueError, match=r"base\.stem\.0\.weight: expected \(8, 3, 3, 3\), got \(8, 3, 5, 5\)"):
        ErrorCorrectionWrapper.from_pretrained(saved, model=base)
    _assert_unchanged(base, before)


def test_resume_with_fewer_images_is_a_clear_error(tmp_path):
    from errwrap import finetune

    finetune(_scenes_wrapper(), _scenes_loader(n=8), steps=3, checkpoint_dir=tmp_path, log_every=None)  # batch 3 of 4
    with pytest.raises(ValueError, match=r"resume.*batch 3.*yields only 1"):
        finetune(
            _scenes_wrapper(), _scenes_loader(n=2), steps=4, checkpoint_dir=tmp_path, resume="latest", log_every=None
        )


# ---------------------------------------------------------------------- 5. atomic model directories
def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_save_removes_temporaries_of_dead_processes_and_keeps_live_ones(tmp_path):
    target = tmp_path / "m"
    dead, live = tmp_path / f".m.tmp-{_dead_pid()}-0a1b2c3d", tmp_path / f".m.tmp-{os.getppid()}-0a1b2c3d"
    for d in (dead, live):
        d.mkdir()
        (d / "config.json").write_text("{}")
    _small_wrapper().save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])


def test_a_directory_set_aside_by_a_killed_save_is_put_back(saved, tmp_path):
    from errwrap._io import atomic_directory

    aside = tmp_path / f".m.old-{_dead_pid()}-0a1b2c3d"
    saved.rename(aside)  # killed between "rename the old one aside" and "rename the new one in"
    with pytest.raises(RuntimeError), atomic_directory(saved):
        raise RuntimeError("the next save fails too")
    assert not aside.exists()
    ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_save_into_a_directory_with_other_files_keeps_them(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    _small_wrapper().save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    ErrorCorrectionWrapper.from_pretrained(target, model=tiny_base())


def test_save_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="expected a directory"):
        _small_wrapper().save_pretrained(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------------- 7. file modes
@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
)
def test_saved_files_get_the_users_umask(tmp_path, umask, file_mode, dir_mode):
    from errwrap import finetune

    old = os.umask(umask)
    try:
        _small_wrapper().save_pretrained(tmp_path / "m")
        finetune(_scenes_wrapper(), _scenes_loader(n=2), steps=1, checkpoint_dir=tmp_path / "ckpt", log_every=None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == dir_mode
    files = [*(tmp_path / "m").iterdir(), tmp_path / "ckpt" / "latest", *(tmp_path / "ckpt" / "step-000001").iterdir()]
    assert len(files) == 6
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(file_mode) for p in files}


# ---------------------------------------------------------------------- 6. outputs checked before training
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="uses /proc as a directory nobody can write")


class _CountingLoader:
    """A loader that counts the batches drawn from it."""

    def __init__(self, loader) -> None:
        self.loader, self.drawn = loader, 0

    def __iter__(self):
        for b in self.loader:
            self.drawn += 1
            yield b


@needs_proc
def test_finetune_refuses_an_unwritable_checkpoint_dir_before_the_first_step():
    from errwrap import finetune

    loader = _CountingLoader(_scenes_loader(n=2))
    with pytest.raises(OSError, match=r"checkpoint_dir /proc/errwrap-nowhere/ckpt: cannot write in /proc"):
        finetune(_scenes_wrapper(), loader, steps=1, checkpoint_dir="/proc/errwrap-nowhere/ckpt", log_every=None)
    assert loader.drawn == 0


def test_finetune_refuses_a_full_disk_before_the_first_step(tmp_path, monkeypatch):
    import shutil

    from errwrap import finetune

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    loader = _CountingLoader(_scenes_loader(n=2))
    with pytest.raises(OSError, match=r"checkpoint_dir .*: 0\.0 MB free on its disk, but saving needs about 0\.\d+ MB"):
        finetune(_scenes_wrapper(), loader, steps=1, checkpoint_dir=tmp_path / "ckpt", log_every=None)
    assert loader.drawn == 0


def test_a_failed_last_checkpoint_goes_to_a_named_fallback(tmp_path, monkeypatch):
    import shutil

    import errwrap.training.checkpoint as training
    from errwrap import finetune
    from errwrap.training import load_checkpoint_weights

    write = training._write_checkpoint

    def full_disk(directory, *args):
        if Path(directory) == tmp_path / "ckpt":
            raise OSError(28, "No space left on device")
        return write(directory, *args)

    monkeypatch.setattr(training, "_write_checkpoint", full_disk)
    wrap = _scenes_wrapper()
    with pytest.warns(
        RuntimeWarning, match="could not write the last checkpoint.*No space left.*written to .*errwrap-checkpoint-"
    ):
        result = finetune(wrap, _scenes_loader(n=2), steps=1, checkpoint_dir=tmp_path / "ckpt", log_every=None)
    try:
        assert result.checkpoint.name == "step-000001" and (result.checkpoint / "state.pt").is_file()
        other = _scenes_wrapper()  # same base, fresh heads
        assert not torch.equal(other.error_head.classifier.weight, wrap.error_head.classifier.weight)
        load_checkpoint_weights(other, result.checkpoint)
        for k, v in wrap.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
    finally:
        shutil.rmtree(result.checkpoint.parent)


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    from errwrap.models import DeepLabV3Plus

    torch.manual_seed(0)
    base = DeepLabV3Plus("resnet18", num_classes=11, aspp_channels=8, decoder_channels=8, low_level_channels=8)
    path = tmp_path_factory.mktemp("cli_model")
    wrap = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8)
    wrap.preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # saved, so the CLI has nothing to note
    wrap.save_pretrained(path)
    return path


@needs_proc
def test_cli_finetune_refuses_an_unwritable_out_before_training(cli_model_dir, capsys):
    from errwrap.cli import main

    argv = [
        "finetune",
        "--model",
        str(cli_model_dir),
        "--data",
        "scenes:2",
        "--size",
        "32",
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert main([*argv, "--out", "/proc/errwrap-nowhere"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("errwrap: error: --out /proc/errwrap-nowhere: cannot write in /proc") and "fine-tuned" not in err
    )


def test_cli_finetune_keeps_the_model_when_the_final_save_fails(cli_model_dir, tmp_path, capsys, monkeypatch):
    import re
    import shutil

    from errwrap.cli import main

    save = ErrorCorrectionWrapper.save_pretrained

    def full_disk(self, directory, **kwargs):
        if Path(directory) == tmp_path / "out":
            raise OSError(28, "No space left on device")
        return save(self, directory, **kwargs)

    monkeypatch.setattr(ErrorCorrectionWrapper, "save_pretrained", full_disk)
    argv = [
        "finetune",
        "--model",
        str(cli_model_dir),
        "--data",
        "scenes:2",
        "--size",
        "32",
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    found = re.search(r"No space left on device.*saved to (\S+) instead", err)
    assert found and "Traceback" not in err, err
    try:
        tuned = ErrorCorrectionWrapper.from_pretrained(found.group(1))
        before = ErrorCorrectionWrapper.from_pretrained(cli_model_dir)
        assert not torch.equal(tuned.error_head.classifier.weight, before.error_head.classifier.weight)
    finally:
        shutil.rmtree(found.group(1))


def test_a_safetensors_write_error_is_an_oserror_and_keeps_the_old_model(saved, monkeypatch):
    from safetensors import SafetensorError

    import errwrap._io as io

    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(io, "save_file", full_disk)
    with pytest.raises(OSError, match=r"model\.safetensors: could not write the weights .*No space left"):
        _small_wrapper(seed=3).save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]


# ---------------------------------------------------------------------- 8. clear errors for the rest
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"clip_grad_norm": float("nan")}, "clip_grad_norm"),
        ({"clip_grad_norm": float("inf")}, "clip_grad_norm"),
    ],
)
def test_finetune_refuses_non_finite_hyperparameters_before_training(kwargs, match):
    from errwrap import finetune

    wrap = _scenes_wrapper()
    before = _state(wrap)
    with pytest.raises(ValueError, match=rf"{match}: expected a finite"):
        finetune(wrap, _scenes_loader(n=2), steps=1, log_every=None, **kwargs)
    _assert_unchanged(wrap, before)


def test_images_on_another_device_than_the_model_get_a_clear_error():
    wrap = _small_wrapper()
    x, _ = batch()
    with pytest.raises(RuntimeError, match=r"images are on meta, the model's parameters on cpu.*\.to\("):
        wrap(x.to("meta"))
    with pytest.raises(RuntimeError, match=r"images are on meta, the model's parameters on cpu"):
        wrap.forward_base(x.to("meta"))


def _png(path: Path, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(path)
    return path


# 64x64 = 4096 pixels: over twice the limit (Pillow's error), or over it (its warning)
@pytest.mark.parametrize("limit", [1000, 3000])
def test_decompression_bomb_images_are_refused_naming_the_file(tmp_path, monkeypatch, limit):
    from PIL import Image

    from errwrap.data.datasets import load_image, load_mask

    path = _png(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    for load in (load_image, load_mask):
        with pytest.raises(ValueError, match=r"bomb\.png: .*4096 pixels.*decompression bomb"):
            load(path)


def test_cli_predict_refuses_a_decompression_bomb_in_one_line(cli_model_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from errwrap.cli import main

    path = _png(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert main(["predict", "--model", str(cli_model_dir), str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("errwrap: error: ")
        and "bomb.png" in err
        and "decompression bomb" in err
        and "Traceback" not in err
    )


def test_a_base_that_returns_another_batch_size_gets_a_clear_error():
    from torch import nn

    class DropsImages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.drop = tiny_base(), False

        def forward(self, x):
            logits, features = self.inner(x)
            return (logits[:1], features) if self.drop else (logits, features)

    base = DropsImages()
    wrap = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8).eval()
    base.drop = True
    with pytest.raises(ValueError, match=r"base output: logits batch 1 for a batch of 2 images"):
        wrap(batch()[0])


def test_calibrate_temperature_never_sets_a_temperature_a_config_would_refuse(monkeypatch):
    import errwrap.calibration as calibration
    from errwrap import calibrate_temperature

    monkeypatch.setattr(calibration, "LOG_T_RANGE", (-12.0, -10.0))  # a search that can only end below 1e-3
    wrap = _small_wrapper()
    wrap.temperature = 2.0
    with pytest.raises(ValueError, match=r"fitted temperature .* outside \[0\.001, 1000\]; kept 2\.0"):
        calibrate_temperature(wrap, [batch()])
    assert wrap.temperature == 2.0


# ---------------------------------------------------------------------- 3b. sizes a file cannot ask for
def test_a_base_spec_that_would_allocate_gigabytes_is_refused_before_allocating(saved):
    spec = {
        "family": "errwrap.DeepLabV3Plus",
        "config": {"encoder_name": "resnet18", "num_classes": 5, "aspp_channels": 100_000},
    }
    _edit_config(saved, lambda c: c.update(base=spec))
    with pytest.raises(ValueError, match=r"base of 51\.\d+ G parameters, more than the 1\.07 G.*model="):
        ErrorCorrectionWrapper.from_pretrained(saved)


def test_head_sizes_that_are_each_in_bounds_but_together_huge_are_refused(saved):
    _edit_config(saved, lambda c: c["heads"].update(error_channels=4096, error_blocks=64))
    with pytest.raises(ValueError, match=r"heads of about 9\d{3} M parameters"):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_oversized_or_deeply_nested_config_files_are_refused(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["class_names"] = ["x" * 1000] * 17_000  # 17 MB
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="larger than the 16777216 errwrap reads"):
        ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())
    for depth in (50, 100_000):
        (saved / CONFIG_NAME).write_text(
            json.dumps({**{k: v for k, v in config.items() if k != "class_names"}}).replace(
                '"base": null', '"base": ' + "[" * depth + "]" * depth
            )
        )
        with pytest.raises(ValueError, match="nested"):
            ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base())


def test_weights_with_nan_or_another_dtype_kind_are_refused_and_load_nothing(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["error_head.classifier.bias"] = torch.tensor([float("nan")])
    tensors["detail_head.classifier.weight"] = tensors["detail_head.classifier.weight"].to(torch.int32)
    save_file(tensors, str(saved / WEIGHTS_NAME))
    base = tiny_base(seed=5)
    before = _state(base)
    with pytest.raises(ValueError) as info:
        ErrorCorrectionWrapper.from_pretrained(saved, model=base)
    assert "NaN/Inf values in ['error_head.classifier.bias']" in str(info.value)
    assert "detail_head.classifier.weight: expected torch.float32, got torch.int32" in str(info.value)
    _assert_unchanged(base, before)


@pytest.mark.parametrize("damage", ["drop_optimizer", "step_negative", "not_a_dict"])
def test_a_damaged_training_state_is_a_clear_error_that_loads_nothing(tmp_path, damage):
    from errwrap import finetune

    result = finetune(_scenes_wrapper(), _scenes_loader(n=2), steps=1, checkpoint_dir=tmp_path, log_every=None)
    state = torch.load(result.checkpoint / "state.pt", weights_only=True)
    if damage == "drop_optimizer":
        del state["optimizer"]
    elif damage == "step_negative":
        state["step"] = -3
    else:
        state = [1, 2, 3]
    torch.save(state, result.checkpoint / "state.pt")
    wrap = _scenes_wrapper(seed=1)
    before = _state(wrap)
    with pytest.raises(ValueError, match=r"state\.pt: (damaged training state|expected errwrap training state)"):
        finetune(wrap, _scenes_loader(n=2), steps=2, checkpoint_dir=tmp_path, resume="latest", log_every=None)
    _assert_unchanged(wrap, before)


def test_a_nested_timm_backbone_is_checked_and_never_pretrained(monkeypatch):
    transformers = pytest.importorskip("transformers")
    import timm

    from errwrap.adapters.specs import build_base

    backbone = transformers.TimmBackboneConfig(
        backbone="resnet18", out_indices=(1, 2, 3, 4), use_pretrained_backbone=True
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=16, auxiliary_channels=8, num_labels=3
    ).to_dict()
    spec = {"family": "transformers", "class": "UperNetForSemanticSegmentation", "config": config}
    calls, create = [], timm.create_model
    monkeypatch.setattr(
        timm, "create_model", lambda name, **kw: calls.append((name, kw.get("pretrained"))) or create(name, **kw)
    )
    build_base(spec)
    assert calls and all(pretrained is False for _, pretrained in calls), calls
    assert config["backbone_config"]["use_pretrained_backbone"] is True  # the caller's spec is not changed
    config["backbone_config"]["backbone"] = "hf-hub:timm/resnet18.a1_in1k"
    with pytest.raises(ValueError, match="backbone"):
        build_base(spec)


@pytest.mark.parametrize("pointer", ["../elsewhere/step-000001", "/tmp/step-000001", "step-000001/../../x", ""])
def test_a_latest_pointer_cannot_send_resume_to_another_directory(tmp_path, pointer):
    from errwrap import finetune

    result = finetune(_scenes_wrapper(), _scenes_loader(n=2), steps=1, checkpoint_dir=tmp_path / "ckpt", log_every=None)
    elsewhere = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(result.checkpoint, elsewhere / "step-000001")
    (tmp_path / "ckpt" / "latest").write_text(pointer + "\n")
    for resume in ("latest", tmp_path / "ckpt"):
        with pytest.raises(ValueError, match=r"latest: expected the name of a checkpoint in the same directory"):
            finetune(
                _scenes_wrapper(),
                _scenes_loader(n=2),
                steps=2,
                checkpoint_dir=tmp_path / "ckpt",
                resume=resume,
                log_every=None,
            )


def test_transformers_name_or_path_notes_are_not_read_and_not_refused():
    transformers = pytest.importorskip("transformers")
    from errwrap.adapters.specs import build_base

    config = transformers.SegformerConfig(
        num_encoder_blocks=1,
        depths=[1],
        sr_ratios=[1],
        hidden_sizes=[8],
        num_attention_heads=[1],
        decoder_hidden_size=8,
        num_labels=3,
    ).to_dict()
    config["_name_or_path"] = "timm/made-up-name"  # where a config came from: informational only
    model = build_base({"family": "transformers", "class": "SegformerForSemanticSegmentation", "config": config})
    assert model.config.num_labels == 3


@pytest.mark.parametrize("exchange", [True, False])
def test_rewriting_a_checkpoint_of_the_same_step_swaps_it_whole(tmp_path, monkeypatch, exchange):
    import shutil

    import errwrap._io as io
    from errwrap.training import _write_checkpoint

    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False, raising=False)
    removed = []
    rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: removed.append(Path(p).name) or rmtree(p, **kw))
    first = _write_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, {"n": 1})
    second = _write_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {"n": 2})
    assert first == second == tmp_path / "step-000003"
    assert torch.load(second / "state.pt", weights_only=True) == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000003"]
    assert "step-000003" not in removed  # the checkpoint in place was never removed before the new one was in


def test_save_into_an_existing_directory_whose_parent_is_read_only_writes_in_place(saved, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == saved.parent else access(p, mode, **kw))
    mkdir = Path.mkdir

    def no_siblings(self, *args, **kwargs):
        if self.parent == saved.parent and self != saved:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_siblings)
    wrap = _small_wrapper(seed=3)
    wrap.temperature = 2.5
    wrap.save_pretrained(saved)
    assert ErrorCorrectionWrapper.from_pretrained(saved, model=tiny_base()).temperature == 2.5


def test_cli_names_the_bad_file_when_a_loader_worker_fails(cli_model_dir, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from errwrap.cli import main

    for directory in ("images", "masks"):
        (tmp_path / directory).mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "images" / "big.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "masks" / "big.png")  # read in this process: fine
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # the worker process inherits it
    data = f"folder:{tmp_path / 'images'},{tmp_path / 'masks'}"
    assert main(["evaluate", "--model", str(cli_model_dir), "--data", data, "--workers", "1", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("errwrap: error: ") and "big.png: 4096 pixels" in err and "decompression bomb" in err, err
    assert len(err.strip().splitlines()) == 1
