"""A new user's first hour (issue 19): the same answers from Python and the CLI, progress on a
pipe, folders of real images, a mistyped model name, warnings a user sees, ``python -m errwrap``,
and pictures with keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import errwrap
from errwrap import ErrorCorrectionWrapper
from errwrap.cli import main
from errwrap.data import Normalize, Scenes
from errwrap.models import DeepLabV3Plus


def _tiny_wrap(num_classes: int = 11) -> ErrorCorrectionWrapper:
    torch.manual_seed(0)
    base = DeepLabV3Plus(
        "resnet18", num_classes=num_classes, aspp_channels=16, decoder_channels=16, low_level_channels=8
    )
    return ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8)


@pytest.fixture(scope="module")
def raw_model_dir(tmp_path_factory):
    """A model saved as the quick start saves it: trained on raw [0, 1] images, preprocessing null."""
    wrap = _tiny_wrap()
    errwrap.finetune(wrap, DataLoader(Scenes(4, size=32), batch_size=2), steps=2, progress=False)
    path = tmp_path_factory.mktemp("raw")
    wrap.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["preprocessing"] is None
    return path


# ---------------------------------------------------------------------- 1. preprocessing agreement
@pytest.mark.parametrize("preprocessing", [None, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}])
def test_cli_evaluate_and_python_evaluate_give_the_same_report(raw_model_dir, tmp_path, preprocessing, capsys):
    model = raw_model_dir
    if preprocessing is not None:  # the same weights, saved as used on normalised images
        wrap = ErrorCorrectionWrapper.from_pretrained(raw_model_dir)
        wrap.preprocessing = preprocessing
        model = tmp_path / "normalised"
        wrap.save_pretrained(model)
    report_path = tmp_path / "cli.json"
    assert (
        main(["evaluate", "--model", str(model), "--data", "scenes:4", "--size", "32", "--json", str(report_path)]) == 0
    )
    err = capsys.readouterr().err
    cli = json.loads(report_path.read_text())

    wrap = ErrorCorrectionWrapper.from_pretrained(model)
    transform = None if preprocessing is None else Normalize(preprocessing["mean"], preprocessing["std"])
    python = errwrap.evaluate(
        wrap, DataLoader(Scenes(4, size=32, split="val", transform=transform), batch_size=4)
    ).to_dict()
    assert cli["num_pixels"] == python["num_pixels"] == 4 * 32 * 32
    assert cli["fused"]["miou"] == pytest.approx(python["fused"]["miou"], abs=1e-6)
    assert cli["base"]["miou"] == pytest.approx(python["base"]["miou"], abs=1e-6)
    assert cli["error_detection"]["error_head"]["auroc"] == pytest.approx(
        python["error_detection"]["error_head"]["auroc"], abs=1e-6
    )
    # the CLI says once that it applies no preprocessing, and only then
    assert err.count("saved without preprocessing") == (1 if preprocessing is None else 0)


def test_cli_finetune_records_the_preprocessing_it_trained_with(raw_model_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["finetune", "--model", str(raw_model_dir), "--data", "scenes:4", "--size", "32", "--steps", "1",
                 "--batch-size", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["preprocessing"] is None
    card = (out / "README.md").read_text()
    assert "- preprocessing: none (RGB in [0, 1])" in card and "not normalised: RGB in [0, 1]" in card


def test_python_finetune_records_the_loaders_normalize_and_warns_on_a_mismatch():
    import warnings

    from errwrap.data import Compose, RandomHorizontalFlip
    from errwrap.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    wrap = _tiny_wrap()
    loader = DataLoader(Scenes(2, size=32, transform=Compose([RandomHorizontalFlip(), Normalize()])), batch_size=2)
    errwrap.finetune(wrap, loader, steps=1, progress=False)
    assert wrap.preprocessing == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert wrap.hub_config()["preprocessing"] == wrap.preprocessing  # what save_pretrained writes

    other = DataLoader(Scenes(2, size=32, transform=Normalize([0.5] * 3, [0.25] * 3)), batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errwrap.finetune(wrap, other, steps=1, progress=False)
    assert any("but wrapper.preprocessing is" in str(w.message) for w in caught)
    assert wrap.preprocessing["std"] == list(IMAGENET_STD)  # the user's own setting is kept
    raw = _tiny_wrap()
    errwrap.finetune(raw, DataLoader(Scenes(2, size=32), batch_size=2), steps=1, progress=False)
    assert raw.preprocessing is None  # nothing normalised the images: nothing to record


# ---------------------------------------------------------------------- 2. README install
def _readme_first_command() -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)[1]
    return first_block.splitlines()[0].split("#")[0].strip()


def test_readme_first_command_installs_from_the_clone_and_says_pip_install_errwrap_is_not_published():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert _readme_first_command() == "pip install -e . && errwrap demo"
    assert "`pip install errwrap` fails" in text and "bash .ci/run" in text
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text


@pytest.mark.slow
def test_readme_first_command_demo_runs_at_a_tiny_size(tmp_path, capsys):
    import shlex

    install, _, demo = _readme_first_command().partition(" && ")
    assert install == "pip install -e ."  # installs the clone; the test runs inside that install
    argv = shlex.split(demo)
    assert argv[0] == "errwrap"
    assert main([*argv[1:], "--quick", "--out", str(tmp_path / "demo")]) == 0
    assert "before/after: mIoU" in capsys.readouterr().out
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["demo"]["image_size"] == 64


# ---------------------------------------------------------------------- 3. progress on a pipe
def test_finetune_and_evaluate_print_progress_lines_when_stdout_is_not_a_terminal(raw_model_dir, tmp_path, capsys):
    import logging

    train_log = logging.getLogger("errwrap.training")
    handlers, level = list(train_log.handlers), train_log.level
    assert main(["finetune", "--model", str(raw_model_dir), "--data", "scenes:4", "--size", "32", "--steps", "4",
                 "--batch-size", "2", "--log-every", "2", "--out", str(tmp_path / "tuned")]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"] and all("loss" in line for line in lines)
    assert train_log.handlers == handlers and train_log.level == level  # the CLI leaves the logger as it was

    assert (
        main(["evaluate", "--model", str(raw_model_dir), "--data", "scenes:6", "--size", "32", "--batch-size", "2"])
        == 0
    )
    lines = [
        line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("evaluate: batch")
    ]
    assert [line.split()[2] for line in lines] == ["1/3,", "2/3,", "3/3,"]


# ---------------------------------------------------------------------- 4. folders are real data
def _folder(root, sizes, *, masks: bool = True):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        if masks:
            Image.fromarray(rng.integers(0, 11, (h, w), dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    return root / "images", root / "masks"


def test_predict_on_a_folder_skips_unreadable_files_writes_the_others_and_exits_1(raw_model_dir, tmp_path, capsys):
    images, _ = _folder(tmp_path, [(24, 32), (40, 16)], masks=False)  # two sizes in one folder
    (images / "broken.png").write_bytes(b"not a png at all")
    good = (images / "im0.png").read_bytes()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])  # a header that reads, a body that does not
    out = tmp_path / "out"
    assert main(["predict", "--model", str(raw_model_dir), str(images), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.glob("*_labels.png")) == ["im0_labels.png", "im1_labels.png"]
    assert Image.open(out / "im1_labels.png").size == (16, 40)
    assert "errwrap: skipped 2 of 4 files" in captured.err
    assert "broken.png: not an image errwrap can read" in captured.err and "truncated.png" in captured.err
    assert captured.out.count("re-labelled") == 2


def test_evaluate_batches_images_of_different_sizes_by_size(raw_model_dir, tmp_path, capsys):
    from errwrap.cli import _batches_by_size

    assert _batches_by_size([(2, 2), (3, 3), (2, 2), (2, 2), (3, 3)], 2) == [[0, 2], [3], [1, 4]]
    images, masks = _folder(tmp_path, [(24, 32), (40, 16), (24, 32)])
    report = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(raw_model_dir), "--data", f"folder:{images},{masks}", "--batch-size", "4",
                 "--json", str(report)]) == 0
    assert "images of 2 different sizes: batched by size" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["num_images"] == 3 and data["num_pixels"] == 2 * 24 * 32 + 40 * 16


def test_finetune_on_fewer_images_than_the_batch_size_and_mixed_sizes(raw_model_dir, tmp_path, capsys):
    images, masks = _folder(tmp_path / "same", [(32, 32), (32, 32)])
    assert main(["finetune", "--model", str(raw_model_dir), "--data", f"folder:{images},{masks}", "--steps", "1",
                 "--out", str(tmp_path / "a")]) == 0  # --batch-size 8 by default
    assert "2 training images, fewer than --batch-size 8: batches of 2" in capsys.readouterr().out
    images, masks = _folder(tmp_path / "mixed", [(32, 32), (24, 40), (32, 32)])
    assert main(["finetune", "--model", str(raw_model_dir), "--data", f"folder:{images},{masks}", "--steps", "2",
                 "--batch-size", "2", "--out", str(tmp_path / "b")]) == 0
    assert "images of 2 different sizes and no --crop: one image per batch" in capsys.readouterr().out
    assert (tmp_path / "b" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- 5. a typo in --model
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("errwrap: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_mistyped_model_is_answered_within_a_second_offline(tmp_path, monkeypatch, capsys):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "errwrap-demo" / "model").mkdir(parents=True)
    for model, message in [
        (
            "errwrap-tests/no-such-model",
            "no local directory 'errwrap-tests/no-such-model' and not found in the Hub cache",
        ),
        ("errwrap-demo/modl", "no local directory 'errwrap-demo/modl'; errwrap-demo holds: model"),
        ("./my-model", "no local directory './my-model', and it is not a Hub repository id"),
    ]:
        start = time.perf_counter()
        assert main(["evaluate", "--model", model, "--data", "scenes:2"]) == 2
        assert time.perf_counter() - start < 1.0
        assert message in _one_line_error(capsys)


def test_a_hub_id_without_network_fails_in_one_line_without_retries(monkeypatch, capsys):
    import errwrap.cli as cli

    monkeypatch.setattr(cli, "_hub_offline", lambda: False)
    monkeypatch.setattr(cli, "_hub_unreachable", lambda: "huggingface.co: Name or service not known")
    assert main(["evaluate", "--model", "errwrap-tests/no-such-model", "--data", "scenes:2"]) == 2
    err = _one_line_error(capsys)
    assert "not in the Hub cache, and the Hub cannot be reached (huggingface.co: Name or service not known)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_clear_line(raw_model_dir, capsys):
    assert main(["evaluate", "--model", str(raw_model_dir), "--data", "scenes:2", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is available here" in _one_line_error(capsys)
    assert main(["evaluate", "--model", str(raw_model_dir), "--data", "scenes:2", "--device", "gpu0"]) == 2
    assert "--device gpu0: not a device name" in _one_line_error(capsys)


# ---------------------------------------------------------------------- 6. warnings a user sees
def test_fresh_heads_warning_is_a_user_warning_at_the_users_call_of_evaluate():
    import warnings

    wrap = _tiny_wrap()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter for UserWarning: shown once per line
        errwrap.evaluate(wrap, DataLoader(Scenes(2, size=32, split="val"), batch_size=2), baselines=())
        line = __import__("inspect").currentframe().f_lineno - 1
    fresh = [w for w in caught if "freshly initialised" in str(w.message)]
    assert len(fresh) == 1 and fresh[0].category is UserWarning
    assert (fresh[0].filename, fresh[0].lineno) == (__file__, line)


# ---------------------------------------------------------------------- 7. python -m errwrap, wording
@pytest.mark.slow
def test_python_m_errwrap_runs_the_cli_with_progress_on_a_pipe(raw_model_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "errwrap", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: errwrap")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "errwrap",
            "evaluate",
            "--model",
            str(raw_model_dir),
            "--data",
            "scenes:2",
            "--size",
            "32",
            "--batch-size",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "evaluate: batch 1/2" in result.stdout and "evaluate: batch 2/2" in result.stdout  # stdout is a pipe here
    assert "corrected - base" in result.stdout


def test_the_cli_table_names_the_corrected_row_as_the_readme_does(raw_model_dir, capsys):
    from pathlib import Path

    assert main(["evaluate", "--model", str(raw_model_dir), "--data", "scenes:2", "--size", "32"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith(("base ", "corrected"))]
    assert rows == ["base", "corrected", "corrected"]  # base, corrected, corrected - base
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "| errwrap, corrected |" in readme and 'the "errwrap, corrected" row is `corrected`' in readme


# ---------------------------------------------------------------------- 8. pictures
def test_keys_match_what_the_panel_draws():
    from errwrap import viz

    bar = viz.colorbar(100)
    assert bar.shape == (viz.KEY_SWATCH, 100, 3)
    assert np.array_equal(bar[0, 0], viz.heatmap(np.zeros((1, 1)))[0, 0]) and np.array_equal(
        bar[0, -1], viz.heatmap(np.ones((1, 1)))[0, 0]
    )
    # one pixel each: fixed, broken, changed and still wrong, unchanged
    base, corrected, gt = np.array([[0, 1, 0, 2]]), np.array([[1, 0, 2, 2]]), np.array([[1, 1, 1, 2]])
    drawn = viz._changed(base, corrected, gt, 255)[0]
    assert [tuple(c) for c in drawn] == [colour for _, colour in viz.CHANGED_KEY]
    drawn = viz._changed(base, corrected, None, 255)[0]
    assert [tuple(c) for c in drawn[[0, 3]]] == [colour for _, colour in viz.CHANGED_KEY_NO_GROUND_TRUTH]


def test_panel_key_shows_each_present_class_colour():
    from errwrap import viz

    palette = viz.palette_for(11)
    key = np.asarray(
        viz.panel_key(500, palette, [2, 7], class_names=[f"class{i}" for i in range(11)], ground_truth=True)
    )
    colours = {tuple(c) for c in key.reshape(-1, 3)}
    assert tuple(palette[2]) in colours and tuple(palette[7]) in colours and tuple(palette[3]) not in colours
    assert all(colour in colours for _, colour in viz.CHANGED_KEY)
    assert key.shape[1] == 500 and key.shape[0] == 3 * viz.KEY_ROW_HEIGHT + 2
    many = viz.panel_key(300, viz.palette_for(150), range(150))  # a long legend wraps and stops at 40 classes
    assert many.width == 300 and many.height > 10 * viz.KEY_ROW_HEIGHT


def test_overlay_and_shrink():
    from errwrap import viz

    image = torch.rand(3, 8, 12)
    colours = np.full((8, 12, 3), 200, np.uint8)
    assert np.array_equal(viz.overlay(image, colours, alpha=0.0), viz.to_uint8_image(image))
    assert np.array_equal(viz.overlay(image, colours, alpha=1.0), colours)
    with pytest.raises(ValueError, match="expected shape"):
        viz.overlay(image, colours[:4])
    wide = Image.new("RGB", (5000, 100))
    assert viz.shrink_to_width(wide, 2048).size == (2048, 41) and viz.shrink_to_width(wide, None) is wide
    assert viz.panel_scale(2048, 2048) == pytest.approx((2048 - 5 * viz.PANEL_GAP) // 6 / 2048)


def test_predict_no_panel_overlay_width_cap_and_json(raw_model_dir, tmp_path, capsys):
    from errwrap.data import load_image

    image_path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 400, 3), dtype=np.uint8)).save(image_path)
    out, results = tmp_path / "out", tmp_path / "results.json"
    argv = ["predict", "--model", str(raw_model_dir), str(image_path), "--out", str(out)]
    assert main([*argv, "--panel-max-width", "600", "--overlay", "--json", str(results)]) == 0
    panel = Image.open(out / "wide_panel.png")
    assert panel.width <= 600 and panel.height < 200
    for name in ("wide_overlay.png", "wide_error_overlay.png"):
        assert Image.open(out / name).size == (400, 24)
    data = json.loads(results.read_text())
    assert data["skipped"] == [] and len(data["images"]) == 1
    entry = data["images"][0]
    assert entry["file"] == str(image_path) and (entry["height"], entry["width"]) == (24, 400)
    assert entry["predicted_accuracy"] == pytest.approx(1.0 - entry["mean_error_prob"], abs=1e-12)
    assert 0.0 <= entry["relabelled_fraction"] <= 1.0
    with torch.no_grad():  # the same number as Python, on the same model and image (no preprocessing saved)
        o = ErrorCorrectionWrapper.from_pretrained(raw_model_dir)(load_image(image_path)[None])
    assert entry["mean_error_prob"] == pytest.approx(float(o.error_prob.mean()), abs=1e-6)
    assert entry["relabelled_fraction"] == pytest.approx(float((o.labels != o.base_labels).float().mean()), abs=1e-6)
    capsys.readouterr()

    out = tmp_path / "bare"
    assert main([*argv[:-1], str(out), "--no-panel"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["wide_error.png", "wide_labels.png"]
