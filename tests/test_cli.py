"""The errwrap command line: errors are one line and exit 2; predict writes the documented files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errwrap import ErrorCorrectionWrapper
from errwrap.cli import build_parser, main
from errwrap.models import DeepLabV3Plus
from errwrap.viz import KEY_ROW_HEIGHT, PANEL_GAP, PANEL_TITLE_HEIGHT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    base = DeepLabV3Plus("resnet18", num_classes=11, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    wrap = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8)
    wrap.preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = tmp_path_factory.mktemp("model")
    wrap.save_pretrained(path, class_names=[f"c{i}" for i in range(11)])
    return path


def test_help_for_every_command(capsys):
    for command in ([], ["demo"], ["predict"], ["evaluate"], ["finetune"], ["estimate"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: errwrap" in capsys.readouterr().out
    assert {"demo", "predict", "evaluate", "finetune", "estimate"} <= set(
        build_parser()._subparsers._group_actions[0].choices
    )


def test_predict_writes_labels_error_map_and_panel(model_dir, tmp_path, capsys):
    image_path = tmp_path / "street.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(image_path)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_dir), str(image_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["street_error.png", "street_labels.png", "street_panel.png"]
    labels = Image.open(out / "street_labels.png")
    assert labels.mode == "P" and labels.size == (56, 40)
    assert np.asarray(labels).max() < 11
    assert Image.open(out / "street_error.png").size == (56, 40)
    panel = Image.open(out / "street_panel.png")
    scale = (panel.size[0] - 5 * PANEL_GAP) // (6 * 56)  # small images are enlarged so the titles fit
    assert scale >= 1 and panel.width == 6 * 56 * scale + 5 * PANEL_GAP
    # the key below: classes, error colour bar, changed pixels
    key_height = panel.height - (40 * scale + PANEL_TITLE_HEIGHT)
    assert 3 * KEY_ROW_HEIGHT <= key_height <= 12 * KEY_ROW_HEIGHT
    assert "re-labelled" in capsys.readouterr().out


def test_evaluate_prints_table_and_writes_json(model_dir, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert (
        main(["evaluate", "--model", str(model_dir), "--data", "scenes:4", "--size", "32", "--json", str(report)]) == 0
    )
    text = capsys.readouterr().out
    assert "error_head" in text and "msp" in text
    data = json.loads(report.read_text())
    assert data["num_images"] == 4 and 0.0 <= data["base"]["miou"] <= 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--model", "/definitely/not/here", "x.png", "--out", "o"], "no such image file"),
        (["evaluate", "--model", "/definitely/not/here", "--data", "scenes:2"], "--model /definitely/not/here"),
        (["evaluate", "--model", "MODEL", "--data", "nonsense:/x"], "unknown kind 'nonsense'"),
        (["evaluate", "--model", "MODEL", "--data", "cityscapes:/definitely/not/here"], "leftImg8bit"),
        (["evaluate", "--model", "MODEL", "--data", "folder:/only-images"], "folder:IMAGES_DIR,MASKS_DIR"),
        (["evaluate", "--model", "MODEL", "--data", "ade20k:/definitely/not/here"], "images/validation"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(model_dir, argv, message, capsys):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("errwrap: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _exit_code(argv):
    """``main``'s exit code, whether it returns it or argparse raises ``SystemExit``."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "errwrap: error: the following arguments are required: COMMAND (see 'errwrap --help')"),
        (
            ["predict", "--model", "MODEL"],
            "errwrap: error: predict: the following arguments are required: images, --out",
        ),
        (
            ["evaluate", "--model", "MODEL", "--data", "scenes:2", "--batch-size", "0"],
            "--batch-size: expected a positive integer, got 0",
        ),
        (["evaluate", "--model", "MODEL", "--data", "scenes:abc"], "expected scenes or scenes:N"),
        (
            ["evaluate", "--model", "MODEL", "--data", "scenes:2", "--json", "TMP"],
            "--json TMP: expected a file name, got an existing directory",
        ),
        (
            ["predict", "--model", "MODEL", "TMP/image.png", "--out", "TMP/a_file"],
            "expected a directory (existing or new), got an existing file",
        ),
        (
            ["finetune", "--model", "MODEL", "--data", "scenes:2", "--steps", "1", "--out", "TMP/a_file"],
            "--out TMP/a_file: expected a directory",
        ),
        (["predict", "--model", "MODEL", "TMP/empty", "--out", "TMP/out"], "a directory without image files"),
        (["predict", "--model", "MODEL", "TMP/a_file", "--out", "TMP/out"], "not an image errwrap can read"),
    ],
)
def test_usage_and_path_errors_are_one_line_before_any_work(model_dir, tmp_path, argv, message, capsys):
    (tmp_path / "a_file").write_text("not an image")
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "image.png")
    argv = [a.replace("MODEL", str(model_dir)).replace("TMP", str(tmp_path)) for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("errwrap: error: ") and message.replace("TMP", str(tmp_path)) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_predict_on_a_directory_of_rgba_gray_16_bit_and_jpeg_images(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(gray).save(images / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "gray16.png")  # the same picture in 16 bits
    Image.fromarray(np.dstack([rgb, np.full((24, 32), 9, np.uint8)])).save(images / "scene.png")  # RGBA
    Image.fromarray(rgb).save(images / "scene.jpg")  # same stem as scene.png
    (images / "notes.txt").write_text("not an image: skipped in a directory")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_dir), str(images), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    stems = ["gray16", "gray8", "scene_jpg", "scene_png"]
    assert names == sorted(f"{s}_{kind}.png" for s in stems for kind in ("error", "labels", "panel"))
    # a 16-bit image is scaled by 65535, not clipped at 255: it predicts exactly what its 8-bit twin does
    assert np.array_equal(
        np.asarray(Image.open(out / "gray16_labels.png")), np.asarray(Image.open(out / "gray8_labels.png"))
    )
    assert np.array_equal(
        np.asarray(Image.open(out / "gray16_error.png")), np.asarray(Image.open(out / "gray8_error.png"))
    )
    assert Image.open(out / "scene_png_labels.png").size == (32, 24)
    assert capsys.readouterr().out.count("re-labelled") == 4


def test_finetune_command_saves_a_loadable_model(model_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model_dir),
                "--data",
                "scenes:4",
                "--size",
                "32",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tuned = ErrorCorrectionWrapper.from_pretrained(out)
    before = ErrorCorrectionWrapper.from_pretrained(model_dir)
    assert not torch.equal(tuned.error_head.classifier.weight, before.error_head.classifier.weight)
    assert (
        torch.equal(tuned.base.classifier.weight, before.base.classifier.weight)
        if hasattr(tuned.base, "classifier")
        else True
    )
    assert tuned.preprocessing == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert "- augment: photometric" in (out / "README.md").read_text()
    assert "- calibrated: True" in (out / "README.md").read_text() and tuned.temperature != 1.0
    plain = tmp_path / "plain"
    args = ["finetune", "--model", str(model_dir), "--data", "scenes:4", "--size", "32", "--steps", "2",
            "--batch-size", "2", "--augment", "none", "--no-calibrate", "--out", str(plain)]  # fmt: skip
    assert main(args) == 0
    assert "- augment: none" in (plain / "README.md").read_text()
    assert "- calibrated: False" in (plain / "README.md").read_text()
    untouched = ErrorCorrectionWrapper.from_pretrained(plain)
    assert not torch.equal(untouched.error_head.classifier.weight, tuned.error_head.classifier.weight)
    assert untouched.temperature == 1.0


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before/after: mIoU" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"report", "demo"} <= set(metrics)
    assert (out / "model" / "model.safetensors").is_file()
    assert len(list((out / "panels").glob("panel_*.png"))) == 2
    assert ErrorCorrectionWrapper.from_pretrained(out / "model").num_classes == 11


def test_help_says_how_to_make_a_model_and_what_needs_python(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert (
        "save_pretrained" in text and "from_pretrained(DIR, model=your_network)" in text and "--label-map 255:1" in text
    )
    for command in ("predict", "evaluate", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "save_pretrained(DIR)" in text and "needs Python" in text
        if command != "predict":
            assert "folder:IMAGES_DIR,MASKS_DIR" in text and "--label-map" in text


def test_a_base_of_your_own_or_heads_only_is_refused_in_cli_terms(tmp_path, capsys):
    class Own(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.ReLU()
            )
            self.classifier = torch.nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    ErrorCorrectionWrapper(Own()).save_pretrained(tmp_path / "own")
    ErrorCorrectionWrapper(Own()).save_pretrained(tmp_path / "heads", heads_only=True)
    for name, what in (("own", "a base network of your own"), ("heads", "holds only the heads")):
        assert main(["evaluate", "--model", str(tmp_path / name), "--data", "scenes:2", "--size", "32"]) == 2
        err = capsys.readouterr().err
        assert what in err and "Use Python: ErrorCorrectionWrapper.from_pretrained(DIR, model=your_network)" in err
        assert len(err.strip().splitlines()) == 1


def _binary_folder(root, n=3):
    rng = np.random.default_rng(0)
    for directory in ("images", "masks"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 4 + i : 20 + i] = 255
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return f"folder:{root / 'images'},{root / 'masks'}"


@pytest.fixture(scope="module")
def binary_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    base = DeepLabV3Plus("resnet18", num_classes=2, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    path = tmp_path_factory.mktemp("binary")
    ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8).save_pretrained(path)
    return path


def test_0_255_binary_masks_need_label_map_and_then_count_the_foreground(binary_model_dir, tmp_path, capsys):
    data = _binary_folder(tmp_path)
    argv = ["evaluate", "--model", str(binary_model_dir), "--data", data, "--batch-size", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "im0.png: the mask holds only 0 and 255" in err and "--label-map 255:1" in err
    report = tmp_path / "report.json"
    assert main([*argv, "--label-map", "255:1", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["num_pixels"] == 3 * 32 * 32  # foreground counted, nothing ignored
    out = tmp_path / "tuned"
    assert main(["finetune", "--model", str(binary_model_dir), "--data", data, "--label-map", "255:1", "--steps", "1",
                 "--batch-size", "2", "--out", str(out)]) == 0
    assert "label_map: 255:1" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label-map", "255=1"], "--label-map '255=1': expected RAW:CLASS pairs"),
        (["--label-map", "255:one"], "expected RAW:CLASS pairs"),
    ],
)
def test_label_map_errors(binary_model_dir, tmp_path, extra, message, capsys):
    data = _binary_folder(tmp_path, n=1)
    assert main(["evaluate", "--model", str(binary_model_dir), "--data", data, *extra]) == 2
    assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", str(binary_model_dir), "--data", "scenes:2", "--label-map", "255:1"]) == 2
    assert "--label-map: only for folder" in capsys.readouterr().err


def test_folder_masks_are_checked_against_the_models_classes_by_file(model_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.full((16, 16), 12, np.uint8)).save(tmp_path / "masks" / "a.png")  # the model has 11 classes
    assert (
        main(["evaluate", "--model", str(model_dir), "--data", f"folder:{tmp_path / 'images'},{tmp_path / 'masks'}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "a.png: label values [12] are neither in 0..10" in err


def test_ade20k_keeps_label_0_for_a_151_class_model(tmp_path, capsys):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "validation" / "ADE_val_00000001.jpg")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 150  # half "other" (0), half the last class
    Image.fromarray(mask).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
    pixels = {}
    for classes in (150, 151):
        torch.manual_seed(0)
        base = DeepLabV3Plus(
            "resnet18", num_classes=classes, aspp_channels=16, decoder_channels=16, low_level_channels=8
        )
        ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8).save_pretrained(tmp_path / str(classes))
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    str(tmp_path / str(classes)),
                    "--data",
                    f"ade20k:{tmp_path}",
                    "--json",
                    str(tmp_path / f"{classes}.json"),
                ]
            )
            == 0
        )
        pixels[classes] = json.loads((tmp_path / f"{classes}.json").read_text())["num_pixels"]
    assert pixels == {150: 16 * 8, 151: 16 * 16}  # label 0 ignored for 150 classes, class "other" for 151


def test_estimate_on_a_labelled_split_and_on_image_files(model_dir, tmp_path, capsys):
    out_json = tmp_path / "estimate.json"
    assert (
        main(
            [
                "estimate",
                "--model",
                str(model_dir),
                "--data",
                "scenes:4",
                "--size",
                "32",
                "--worst",
                "2",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "errwrap estimate (no labels): 4 images, 4096 pixels" in text and "avg_confidence" in text
    data = json.loads(out_json.read_text())
    assert data["num_images"] == 4 and [r["index"] for r in data["per_image"]] == [0, 1, 2, 3]
    assert 0.0 <= data["pixel_accuracy"] <= 1.0 and 0.0 <= data["miou"] <= 1.0
    blurred = tmp_path / "blurred.json"
    assert (
        main(
            [
                "estimate",
                "--model",
                str(model_dir),
                "--data",
                "scenes:4",
                "--size",
                "32",
                "--corrupt",
                "blur:5",
                "--json",
                str(blurred),
            ]
        )
        == 0
    )
    assert json.loads(blurred.read_text())["mean_error_prob"] != data["mean_error_prob"]  # the shift reaches the model
    capsys.readouterr()
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, shape in (("a.png", (40, 56, 3)), ("b.jpg", (32, 32, 3))):  # different sizes: one image per batch
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(folder / name)
    assert main(["estimate", "--model", str(model_dir), "--data", f"images:{folder}", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["per_image"]
    assert sorted(Path(r["file"]).name for r in rows) == ["a.png", "b.jpg"]
    assert [r["num_pixels"] for r in rows] == [40 * 56, 32 * 32]
    assert "files, most likely wrong first:" in text
    assert main(["estimate", "--model", str(model_dir), "--data", f"images:{tmp_path / 'none'}"]) == 2
    assert "no such image file" in capsys.readouterr().err
