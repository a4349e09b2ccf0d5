import numpy as np
import pytest
import torch

from errwrap.data.scenes import POLE, SCENE_CLASSES, WIRE, Scenes, render_scene
from errwrap.data.transforms import RandomHorizontalFlip


def test_same_seed_and_index_give_the_same_bytes():
    a, b = Scenes(4, size=40, seed=3), Scenes(4, size=40, seed=3)
    for i in range(4):
        (ia, la), (ib, lb) = a[i], b[i]
        assert ia.numpy().tobytes() == ib.numpy().tobytes()
        assert la.numpy().tobytes() == lb.numpy().tobytes()
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], Scenes(4, size=40, seed=4)[0][0])
    assert not torch.equal(a[0][0], Scenes(4, size=40, seed=3, split="val")[0][0])
    assert torch.equal(a[-1][1], a[3][1])


def test_items_are_images_in_unit_range_and_int64_labels():
    ds = Scenes(3, size=(48, 72))
    image, label = ds[2]
    assert image.shape == (3, 48, 72) and image.dtype == torch.float32
    assert label.shape == (48, 72) and label.dtype == torch.int64
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert label.min() >= 0 and label.max() < ds.num_classes
    assert ds.num_classes == len(ds.class_names) == len(SCENE_CLASSES) >= 8
    assert len(ds) == 3


def test_every_class_appears_and_no_class_dominates():
    counts = np.zeros(len(SCENE_CLASSES), dtype=np.int64)
    for i in range(200):
        _, label = render_scene(0, "train", i, 32)
        counts += np.bincount(label.ravel(), minlength=len(SCENE_CLASSES))
    assert (counts > 0).all(), dict(zip(SCENE_CLASSES, counts.tolist(), strict=False))
    share = counts / counts.sum()
    assert share.max() < 0.4 and share.min() > 0.005


def _runs_survive(mask: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Pixels of ``mask`` whose ``width`` neighbours along ``axis`` are all in the mask too."""
    out = mask.copy()
    for shift in range(1, width // 2 + 1):
        out &= np.roll(mask, shift, axis) & np.roll(mask, -shift, axis)
    return out


def test_thin_structures_are_a_few_pixels_wide():
    pole_px = pole_wide = wire_px = wire_wide = 0
    for i in range(60):
        _, label = render_scene(1, "train", i, 96)
        pole, wire = label == POLE, label == WIRE
        pole_px += pole.sum()
        pole_wide += _runs_survive(pole, 5, axis=1).sum()  # poles are near-vertical: thin across x
        wire_px += wire.sum()
        wire_wide += (_runs_survive(wire, 5, axis=0) & _runs_survive(wire, 5, axis=1)).sum()
    assert pole_px > 200 and wire_px > 200
    assert pole_wide / pole_px < 0.1  # almost no pole pixel has 2 pole pixels on each side
    assert wire_wide / wire_px < 0.1


def test_textures_are_not_flat_colours():
    image, label = Scenes(1, size=96, seed=5)[0]
    for c in label.unique():
        pixels = image[:, label == c]
        if pixels.shape[1] > 200:
            assert pixels.std(dim=1).max() > 0.01


def test_transform_and_cache():
    ds = Scenes(2, size=32, transform=RandomHorizontalFlip(p=1.0), cache=True)
    image, label = ds[0]
    raw_image, raw_label = Scenes(2, size=32)[0]
    assert torch.equal(image, raw_image.flip(-1)) and torch.equal(label, raw_label.flip(-1))
    assert torch.equal(ds[0][0], image)  # cached copy, transformed again identically


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        Scenes(2, split="training")
    with pytest.raises(ValueError, match="num_images"):
        Scenes(-1)
    with pytest.raises(ValueError, match="size"):
        render_scene(0, "train", 0, 4)
    with pytest.raises(IndexError):
        Scenes(2)[2]
