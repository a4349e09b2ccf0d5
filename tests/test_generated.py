"""The generated families ``Aerial`` and ``Cells``, the registry, ``Corrupt``, and the CLI's
``--data NAME:N`` / ``--corrupt KIND:SEVERITY``."""

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from errwrap.cli import GENERATED_KINDS, CLIError, parse_corrupt, parse_data_spec
from errwrap.data import (
    AERIAL_CLASSES,
    CELL_CLASSES,
    CORRUPTIONS,
    GENERATED,
    Aerial,
    Cells,
    Corrupt,
    RandomHorizontalFlip,
    Scenes,
    generated,
    render_aerial,
    render_cells,
)
from errwrap.data.aerial import CAR, ROAD, SOIL
from errwrap.data.cells import BOUNDARY

FAMILIES = [Aerial, Cells]


def _digest(image: torch.Tensor, label: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes() + label.numpy().tobytes()).hexdigest()


def _thick(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` with ``width // 2`` mask pixels on each side along both axes."""
    out = mask.copy()
    for axis in (0, 1):
        for shift in range(1, width // 2 + 1):
            out &= np.roll(mask, shift, axis) & np.roll(mask, -shift, axis)
    return out


# ---------------------------------------------------------------------- families
@pytest.mark.parametrize("family", FAMILIES)
def test_items_are_images_in_unit_range_and_int64_labels(family):
    ds = family(3, size=(40, 56))
    image, label = ds[2]
    assert image.shape == (3, 40, 56) and image.dtype == torch.float32
    assert label.shape == (40, 56) and label.dtype == torch.int64
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert int(label.min()) >= 0 and int(label.max()) < ds.num_classes
    assert ds.num_classes == len(ds.class_names) and ds.ignore_index == 255 and len(ds) == 3
    assert repr(ds) == f"{family.__name__}(num_images=3, size=(40, 56), seed=0, split='train')"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_triple_gives_the_same_bytes_and_any_change_another_image(family):
    a, b = family(3, size=32, seed=7), family(3, size=32, seed=7)
    for i in range(3):
        assert _digest(*a[i]) == _digest(*b[i])
    others = {
        _digest(*a[1]),
        _digest(*family(3, size=32, seed=8)[0]),
        _digest(*family(3, size=32, seed=7, split="val")[0]),
    }
    assert _digest(*a[0]) not in others and len(others) == 3
    assert torch.equal(a[-1][1], a[2][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_splits_are_disjoint(family):
    digests = {
        split: {_digest(*family(12, size=24, split=split)[i]) for i in range(12)} for split in ("train", "val", "test")
    }
    assert all(len(d) == 12 for d in digests.values())
    assert (
        not (digests["train"] & digests["val"])
        and not (digests["train"] & digests["test"])
        and not (digests["val"] & digests["test"])
    )


def test_two_families_with_one_seed_are_not_the_same_random_stream():
    aerial, cells = Aerial(1, size=32)[0][0], Cells(1, size=32)[0][0]
    assert not torch.equal(aerial, cells)


@pytest.mark.parametrize("render, names", [(render_aerial, AERIAL_CLASSES), (render_cells, CELL_CLASSES)])
def test_every_class_appears_over_twenty_images(render, names):
    counts = np.zeros(len(names), dtype=np.int64)
    for i in range(20):
        counts += np.bincount(render(0, "train", i, 64)[1].ravel(), minlength=len(names))
    assert (counts > 0).all(), dict(zip(names, counts.tolist(), strict=False))


@pytest.mark.parametrize("render, num_classes", [(render_aerial, 6), (render_cells, 3)])
def test_colour_alone_does_not_separate_the_classes(render, num_classes):
    """Even the best lookup from a pixel's colour (8 levels per channel, fitted on the very pixels
    it is scored on) reaches a low mIoU: texture, shape and context are needed."""
    table = np.zeros((512, num_classes))
    for i in range(20):
        image, label = render(0, "train", i, 64)
        q = np.minimum((image * 8).astype(int), 7)
        np.add.at(table, ((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), label.ravel()), 1)
    predicted = table.argmax(1)
    confusion = np.zeros((num_classes, num_classes))
    for c in range(num_classes):
        np.add.at(confusion[:, c], predicted, table[:, c])
    tp = np.diag(confusion)
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
    assert iou.mean() < 0.6, iou.round(2)


def test_aerial_is_imbalanced_with_thin_roads_and_small_cars():
    counts = np.zeros(len(AERIAL_CLASSES), dtype=np.int64)
    road_px = road_thick = 0
    car_sizes = []
    for i in range(20):
        _, label = render_aerial(1, "train", i, 128)
        counts += np.bincount(label.ravel(), minlength=len(AERIAL_CLASSES))
        road = (label == ROAD) | (label == CAR)
        road_px += road.sum()
        road_thick += _thick(road, 9).sum()  # roads are at most 7 px wide (plus blur of the label: none)
        car_sizes.append((label == CAR).sum())
    share = counts / counts.sum()
    assert share[SOIL] > 0.3 and 0 < share[CAR] < 0.01
    assert road_px > 0 and road_thick / road_px < 0.05
    assert 0 < sum(car_sizes) / max(1, sum(1 for s in car_sizes if s)) < 200  # a few cars of a few pixels per tile


def test_cells_are_grey_with_a_thin_boundary():
    boundary_px = boundary_thick = 0
    for i in range(10):
        image, label = render_cells(2, "train", i, 96)
        channels = image.reshape(-1, 3)
        assert np.abs(channels - channels.mean(1, keepdims=True)).mean() < 0.03  # a faint tint only
        mask = label == BOUNDARY
        boundary_px += mask.sum()
        boundary_thick += _thick(mask, 5).sum()
    assert boundary_px > 0 and boundary_thick / boundary_px < 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_transform_and_cache(family):
    ds = family(2, size=24, transform=RandomHorizontalFlip(p=1.0), cache=True)
    image, label = ds[0]
    raw_image, raw_label = family(2, size=24)[0]
    assert torch.equal(image, raw_image.flip(-1)) and torch.equal(label, raw_label.flip(-1))
    assert torch.equal(ds[0][0], image)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_arguments(family):
    with pytest.raises(ValueError, match="split: expected one of"):
        family(2, split="training")
    with pytest.raises(ValueError, match="num_images"):
        family(-1)
    with pytest.raises(ValueError, match="size: expected at least 16x16"):
        family(2, size=8)
    with pytest.raises(IndexError, match=f"out of range for {family.__name__}"):
        family(2)[2]


# ---------------------------------------------------------------------- registry
def test_registry_names_every_family():
    assert {"scenes": Scenes, "aerial": Aerial, "cells": Cells} == GENERATED
    ds = generated("aerial", 3, size=32, split="val", seed=2)
    assert (
        isinstance(ds, Aerial) and len(ds) == 3 and ds.split == "val" and ds.seed == 2 and ds[0][0].shape == (3, 32, 32)
    )
    with pytest.raises(ValueError, match="expected one of scenes, aerial, cells, got 'city'"):
        generated("city", 2)


# ---------------------------------------------------------------------- Corrupt
def _photo(size: int = 64) -> torch.Tensor:
    return Scenes(1, size=size, seed=3)[0][0]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_changes_the_image_and_keeps_shape_dtype_and_range(kind):
    image = _photo()
    for x in (image, torch.stack([image, image.flip(-1)])):
        out = Corrupt(kind, 3)(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert float((out - x).abs().mean()) > 0.01
    assert Corrupt(kind, 3)(torch.zeros(0, 3, 8, 8)).shape == (0, 3, 8, 8)
    half = Corrupt(kind, 3)(image.bfloat16())
    assert half.dtype == torch.bfloat16 and float((half.float() - image).abs().mean()) > 0.01


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_stronger_severity_changes_the_image_more(kind):
    image = _photo(96)
    change = [float((Corrupt(kind, s)(image) - image).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


def test_severity_three_parameters():
    impulse = torch.zeros(3, 128, 128)
    impulse[:, 64, 64] = 1.0
    blurred = Corrupt("blur", 3)(impulse)[0]
    offsets = (torch.arange(128.0) - 64.0) ** 2
    variance = float((blurred.sum(1) * offsets).sum() / blurred.sum())
    assert variance == pytest.approx(1.5**2, rel=0.02)  # sigma 1.5 px at 128 px

    grey = torch.full((3, 64, 64), 0.5)
    assert torch.allclose(Corrupt("dark", 3)(grey), torch.full_like(grey, 0.4 * 0.5**1.5))
    noisy = Corrupt("noise", 3)(grey)
    assert float((noisy - grey).std()) == pytest.approx(0.08, rel=0.05) and abs(float((noisy - grey).mean())) < 0.005
    fog = Corrupt("fog", 3)(torch.zeros(3, 64, 64))
    assert 0.4 * 0.45 < float(fog.mean()) < 0.4 * 0.75  # 40% of a haze around 0.6

    image = _photo()
    jpeg = Corrupt("jpeg", 3)(image)
    assert torch.equal(jpeg, (jpeg * 255).round() / 255)  # 8-bit levels
    assert float((jpeg - image).abs().mean()) > float((Corrupt("jpeg", 1)(image) - image).abs().mean())
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(
        buffer, format="JPEG", quality=20, subsampling=2
    )
    expected = torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(jpeg, expected)  # quality 20


def test_corruption_is_deterministic_per_image_and_index():
    image = _photo()
    other = image.flip(-2)
    noise = Corrupt("noise", 2, seed=1)
    assert torch.equal(noise(image), noise(image))
    delta_a, delta_b = noise(image) - image, noise(other) - other
    assert not torch.allclose(delta_a, delta_b, atol=1e-3)  # different images, different noise
    assert not torch.equal(noise(image), Corrupt("noise", 2, seed=2)(image))
    batch = noise(torch.stack([image, other]), index=5)
    assert torch.equal(batch[0], noise(image, index=5)) and torch.equal(batch[1], noise(other, index=6))
    assert not torch.equal(noise(image, index=5), noise(image, index=6))


def test_joint_is_a_dataset_transform_that_keeps_the_label():
    corrupt = Corrupt("fog", 4)
    image, label = Cells(2, size=32, transform=corrupt.joint)[1]
    raw_image, raw_label = Cells(2, size=32)[1]
    assert torch.equal(label, raw_label) and torch.equal(image, corrupt(raw_image))
    assert repr(corrupt) == "Corrupt('fog', severity=4, seed=0)"


def test_corrupt_bad_arguments():
    with pytest.raises(ValueError, match="kind: expected one of blur, fog, noise, dark, jpeg, got 'rain'"):
        Corrupt("rain")
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity: expected an integer from 1"):
            Corrupt("blur", severity)
    with pytest.raises(ValueError, match="expected values in \\[0, 1\\] \\(corrupt before Normalize\\)"):
        Corrupt("blur")(torch.full((3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="CxHxW or BxCxHxW"):
        Corrupt("blur")(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="jpeg expects 1 or 3 channels, got 4"):
        Corrupt("jpeg")(torch.zeros(4, 8, 8))


# ---------------------------------------------------------------------- CLI
def test_cli_data_accepts_every_generated_family():
    assert tuple(GENERATED) == GENERATED_KINDS
    ds = parse_data_spec("aerial:3", "val", size=32)
    assert isinstance(ds, Aerial) and len(ds) == 3 and ds.split == "val" and ds[0][0].shape == (3, 32, 32)
    assert isinstance(parse_data_spec("CELLS", "train"), Cells) and len(parse_data_spec("cells", "train")) == 200
    with pytest.raises(CLIError, match="expected aerial or aerial:N"):
        parse_data_spec("aerial:x", "val")
    with pytest.raises(
        CLIError, match="expected one of scenes\\[:N\\], aerial\\[:N\\], cells\\[:N\\], cityscapes:PATH"
    ):
        parse_data_spec("forest:3", "val")


def test_cli_corrupt_spec():
    assert parse_corrupt(None) is None
    fog = parse_corrupt("fog:2")
    assert (fog.kind, fog.severity) == ("fog", 2)
    assert parse_corrupt("jpeg").severity == 3
    for bad in ("rain:2", "fog:6", "fog:", "fog:two"):
        with pytest.raises(CLIError, match="--corrupt .*: expected KIND or KIND:SEVERITY"):
            parse_corrupt(bad)



@pytest.fixture(scope="module")
def aerial_model(tmp_path_factory):
    from errwrap import ErrorCorrectionWrapper
    from errwrap.models import DeepLabV3Plus

    torch.manual_seed(0)
    base = DeepLabV3Plus("resnet18", num_classes=6, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    path = tmp_path_factory.mktemp("aerial_model")
    ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8).save_pretrained(path)
    return path


def test_cli_evaluate_on_a_generated_family_under_a_shift(aerial_model, tmp_path, capsys):
    import json

    from errwrap.cli import main

    reports = {}
    for name, extra in (("clean", []), ("fog", ["--corrupt", "fog:5"])):
        path = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    str(aerial_model),
                    "--data",
                    "aerial:2",
                    "--size",
                    "32",
                    "--json",
                    str(path),
                    *extra,
                ]
            )
            == 0
        )
        reports[name] = json.loads(path.read_text())
    assert reports["clean"]["num_images"] == reports["fog"]["num_images"] == 2
    assert reports["clean"]["calibration"] != reports["fog"]["calibration"]  # the model saw other images
    assert main(["evaluate", "--model", str(aerial_model), "--data", "cells:2", "--size", "32"]) == 2
    assert "the data has 3 classes, the model 6" in capsys.readouterr().err


def test_cli_predict_under_a_shift(aerial_model, tmp_path):
    from errwrap.cli import main

    image_path = tmp_path / "tile.png"
    Image.fromarray((Aerial(1, size=32)[0][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(image_path)
    for name, extra in (("clean", []), ("dark", ["--corrupt", "dark:5"])):
        assert (
            main(["predict", "--model", str(aerial_model), str(image_path), "--out", str(tmp_path / name), *extra]) == 0
        )
    assert (tmp_path / "dark" / "tile_error.png").is_file()
    panels = [np.asarray(Image.open(tmp_path / name / "tile_panel.png")) for name in ("clean", "dark")]
    assert panels[0].shape == panels[1].shape and not np.array_equal(*panels)  # the panel shows the darkened input
