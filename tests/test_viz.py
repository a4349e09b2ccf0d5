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


def test_risk_coverage_plot_draws_each_curve_where_it_belongs(tmp_path):
    coverage = np.linspace(0.01, 1.0, 5000)
    curves = {"diagonal": (coverage, 0.4 * coverage), "flat": (coverage, np.full_like(coverage, 0.1))}
    path = viz.risk_coverage_plot(curves, tmp_path / "rc.png", size=(400, 300), title="t", max_risk=0.5)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (300, 400, 3)
    blue, red = np.array(viz.PLOT_COLORS[0]), np.array(viz.PLOT_COLORS[1])
    # plot area: left 52, right 14, top 24, bottom 38 -> x = 52 + c * 334, y = 24 + 238 * (1 - risk / 0.5)
    for c in (0.25, 0.5, 0.75):
        x = int(round(52 + c * 334))
        column = img[:, x]
        blue_rows = np.nonzero(np.abs(column - blue).sum(1) < 30)[0]
        red_rows = np.nonzero(np.abs(column - red).sum(1) < 30)[0]
        assert abs(blue_rows.mean() - (24 + 238 * (1 - 0.4 * c / 0.5))) <= 2, c
        assert abs(red_rows.mean() - (24 + 238 * (1 - 0.1 / 0.5))) <= 2, c


def test_risk_coverage_plot_from_the_curve_function_and_input_checks(tmp_path):
    g = torch.Generator().manual_seed(0)
    errors = torch.rand(3000, generator=g) < 0.2
    scores = torch.rand(3000, generator=g)
    coverage, risk = viz.risk_coverage_curve(scores, errors)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(float(errors.double().mean()))
    assert np.all(np.diff(coverage) > 0) and len(coverage) == len(np.unique(scores.numpy()))
    path = viz.risk_coverage_plot({"random": (coverage, risk)}, tmp_path / "one.png")
    assert Image.open(path).size == (560, 380)
    with pytest.raises(ValueError, match="same non-zero length"):
        viz.risk_coverage_plot({"bad": (coverage, risk[:-1])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        viz.risk_coverage_plot({"bad": (coverage * 2, risk)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-empty dict"):
        viz.risk_coverage_plot({}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
