import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from errwrap import viz


def test_palettes():
    assert viz.palette_for(19).tolist()[0] == [128, 64, 128]  # Cityscapes road
    gen = viz.generated_palette(150)
    assert gen.shape == (150, 3) and len({tuple(c) for c in gen}) == 150
    assert tuple(gen[0]) != (0, 0, 0)
    assert viz.ade20k_palette().shape == (150, 3)
    with pytest.raises(ValueError, match="19 colours"):
        viz.palette_for(20, "cityscapes")


def test_colorize_and_ignore():
    palette = viz.generated_palette(3)
    labels = np.array([[0, 1], [2, 255]])
    rgb = viz.colorize(labels, palette)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 1] == palette[1]).all() and (rgb[1, 1] == 0).all()


def test_heatmap_is_monotone_in_brightness():
    rgb = viz.heatmap(torch.linspace(0, 1, 11).view(1, 11)).astype(int)
    brightness = rgb.sum(-1)[0]
    assert (np.diff(brightness) > 0).all()
    assert tuple(rgb[0, 0]) == (0, 0, 4) and tuple(rgb[0, -1]) == (252, 255, 164)


def test_panel_layout_and_changed_colours():
    h, w = 12, 10
    base = torch.zeros(h, w, dtype=torch.long)
    gt = torch.zeros(h, w, dtype=torch.long)
    gt[0, 0] = 1
    corrected = base.clone()
    corrected[0, 0] = 1  # fixed
    corrected[5, 5] = 2  # broken
    untitled = viz.make_panel(torch.rand(3, h, w), base, torch.rand(h, w), corrected, ground_truth=gt, titles=False)
    assert untitled.size == (6 * w + 5 * viz.PANEL_GAP, h)
    panel = viz.make_panel(torch.rand(3, h, w), base, torch.rand(h, w), corrected, ground_truth=gt, num_classes=3)
    # tiles narrower than their titles are enlarged by a whole factor, so every title fits its tile
    scale = (panel.size[0] - 5 * viz.PANEL_GAP) // (6 * w)
    assert panel.size == (6 * w * scale + 5 * viz.PANEL_GAP, h * scale + viz.PANEL_TITLE_HEIGHT)
    widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t) for t in viz.PANEL_TITLES)
    assert scale > 1 and w * scale >= widest
    for arr, s, top in ((np.asarray(untitled), 1, 0), (np.asarray(panel), scale, viz.PANEL_TITLE_HEIGHT)):
        x0 = 5 * (w * s + viz.PANEL_GAP)
        assert tuple(arr[top + 0, x0 + 0]) == (0, 200, 0)
        assert tuple(arr[top + 5 * s, x0 + 5 * s]) == (220, 0, 0)
        assert tuple(arr[top + 1 * s, x0 + 1 * s]) == (40, 40, 40)


def test_panel_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="error_prob"):
        viz.make_panel(torch.rand(3, 8, 8), torch.zeros(8, 8), torch.rand(4, 4), torch.zeros(8, 8))


def test_png_writers_round_trip(tmp_path):
    labels = np.array([[0, 1, 2], [2, 1, 0]])
    path = viz.save_label_png(labels, tmp_path / "labels.png", viz.generated_palette(3))
    img = Image.open(path)
    assert img.mode == "P" and (np.asarray(img) == labels).all()
    heat = Image.open(viz.save_heatmap_png(torch.rand(5, 7), tmp_path / "err.png"))
    assert heat.size == (7, 5) and heat.mode == "RGB"


def test_to_uint8_image_denormalises():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = torch.zeros(3, 2, 2)  # normalised zero == mean
    assert (viz.to_uint8_image(x, mean, std) == 128).all()
