"""Four user journeys end to end, each as a practitioner would walk it: tiny random models, a
few training steps, data written to a temporary directory.

1. binary segmentation: SMP ``Unet(classes=1)``, JPEG images and 0/255 PNG masks;
2. a torchvision model saved from Python, then fine-tuned, evaluated and run by the CLI;
3. a transformers SegFormer on an ADE20K tree, bf16 on CPU, exported and checked against eager;
4. a researcher comparing error scores (MC dropout on a base without dropout) and reading the
   report's JSON, on images of different sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import errwrap
from errwrap import ErrorCorrectionWrapper
from errwrap.cli import main
from errwrap.data import ADE20K, Compose, Normalize, RandomHorizontalFlip, Resize, SegmentationFolder, load_image
from errwrap.evaluation import EvaluationReport


def _image_folder(root, n, size=(32, 32), mask_fn=None, image_ext="png", seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        h, w = size
        mask = mask_fn(i, h, w, rng)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[mask > 0] //= 3  # the foreground is darker: something to learn
        Image.fromarray(image).save(root / "images" / f"im{i}.{image_ext}")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root / "images", root / "masks"


# ---------------------------------------------------------------------------- 1. binary
def _square_0_255(i, h, w, rng):
    mask = np.zeros((h, w), np.uint8)
    mask[6 + i : 22 + i, 4:20] = 255  # what binary data sets look like: 255 = foreground
    return mask


@pytest.mark.slow
@pytest.mark.optional
def test_binary_unet_with_0_255_masks_from_folder_to_cli_predict(tmp_path, capsys):
    smp = pytest.importorskip("segmentation_models_pytorch")
    images, masks = _image_folder(tmp_path / "data", 4, mask_fn=_square_0_255, image_ext="jpg")
    # 255 is also the default ignore_index: read as-is, every foreground pixel would be ignored.
    with pytest.raises(ValueError, match=r"label_map=\{255: 1\}"):
        SegmentationFolder(images, masks)
    train = SegmentationFolder(
        images, masks, num_classes=2, label_map={255: 1}, transform=Compose([RandomHorizontalFlip(), Normalize()])
    )
    val = SegmentationFolder(images, masks, num_classes=2, label_map={255: 1}, transform=Normalize())
    assert sorted(val[0][1].unique().tolist()) == [0, 1] and int(val[0][1].sum()) == 16 * 16

    torch.manual_seed(0)
    base = smp.Unet("resnet18", encoder_weights=None, classes=1, encoder_depth=3, decoder_channels=(16, 8, 8))
    wrap = ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8)
    assert wrap.binary and wrap.num_classes == 2
    result = errwrap.finetune(
        wrap, DataLoader(train, batch_size=2, shuffle=True), steps=2, progress=False, log_every=None
    )
    assert result.step == 2 and all(np.isfinite(h["loss"]) for h in result.history)

    report = errwrap.evaluate(wrap, DataLoader(val, batch_size=2))
    assert report.num_pixels == 4 * 32 * 32  # nothing ignored: the foreground is counted
    assert len(report.base.iou) == 2 and report.error_detection["msp"].num_errors + 0 >= 0

    wrap.save_pretrained(tmp_path / "model", metrics=report.to_dict())
    again = ErrorCorrectionWrapper.from_pretrained(tmp_path / "model")
    x = torch.stack([val[0][0], val[1][0]])
    with torch.no_grad():
        expected = wrap.eval()(x)
        loaded = again(x)
    assert torch.equal(loaded.labels, expected.labels) and torch.allclose(loaded.error_prob, expected.error_prob)

    assert main(["predict", "--model", str(tmp_path / "model"), str(images), "--out", str(tmp_path / "pred")]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(
        f"im{i}_{k}.png" for i in range(4) for k in ("error", "labels", "panel")
    )
    written = np.asarray(Image.open(tmp_path / "pred" / "im0_labels.png"))
    image, _ = Normalize()(load_image(images / "im0.jpg"), torch.zeros(32, 32, dtype=torch.long))
    with torch.no_grad():
        python_labels = again(image[None]).labels[0].numpy()
    assert np.array_equal(written, python_labels)  # the CLI predicts what Python predicts
    assert set(np.unique(written).tolist()) <= {0, 1}
    assert capsys.readouterr().out.count("re-labelled") == 4


# ---------------------------------------------------------------------------- 2. torchvision via the CLI
def _classes_0_to_4(i, h, w, rng):
    return (np.arange(w)[None, :].repeat(h, 0) * 5 // w).astype(np.uint8)  # five vertical bands


@pytest.mark.slow
@pytest.mark.optional
def test_torchvision_model_saved_from_python_then_cli_finetune_evaluate_predict(tmp_path, capsys):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    base = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)
    ErrorCorrectionWrapper(base).save_pretrained(tmp_path / "m0")  # what the user does in Python
    images, masks = _image_folder(tmp_path / "data", 3, mask_fn=_classes_0_to_4)
    data = f"folder:{images},{masks}"

    assert (
        main(
            [
                "finetune",
                "--model",
                str(tmp_path / "m0"),
                "--data",
                data,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "m1"),
            ]
        )
        == 0
    )
    assert "saved to" in capsys.readouterr().out
    before = ErrorCorrectionWrapper.from_pretrained(tmp_path / "m0")
    after = ErrorCorrectionWrapper.from_pretrained(tmp_path / "m1")
    base_before, base_after = before.base.state_dict(), after.base.state_dict()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # the base stayed frozen
    assert not torch.equal(before.error_head.classifier.weight, after.error_head.classifier.weight)

    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "m1"),
                "--data",
                data,
                "--batch-size",
                "3",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    report = EvaluationReport.from_json(tmp_path / "r.json")
    assert report.num_images == 3 and report.num_pixels == 3 * 32 * 32 and len(report.base.iou) == 5
    assert (
        main(["predict", "--model", str(tmp_path / "m1"), str(images / "im0.png"), "--out", str(tmp_path / "pred")])
        == 0
    )
    assert np.asarray(Image.open(tmp_path / "pred" / "im0_labels.png")).max() < 5


# ---------------------------------------------------------------------------- 3. SegFormer on ADE20K, export
def _ade_tree(root, n=2):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = (40, 56) if i % 2 else (48, 32)  # ADE20K images differ in size
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{split}_{i:08d}.jpg"
            )
            Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(
                root / "annotations" / split / f"ADE_{split}_{i:08d}.png"
            )


@pytest.mark.slow
@pytest.mark.optional
def test_segformer_on_ade20k_bf16_finetune_evaluate_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    _ade_tree(tmp_path / "ADEChallengeData2016")
    transform = Compose([Resize(32), Normalize()])
    train, val = ADE20K(tmp_path, "train", transform=transform), ADE20K(tmp_path, "val", transform=transform)
    raw = np.asarray(
        Image.open(tmp_path / "ADEChallengeData2016/annotations/validation/ADE_validation_00000000.png")
    ).astype(np.int64)
    unresized = ADE20K(tmp_path, "val")[0][1].numpy()
    assert np.array_equal(unresized, np.where(raw == 0, 255, raw - 1))  # reduce_zero_label: 0 ("other") ignored

    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16,
        num_labels=150,
    )  # fmt: skip
    wrap = ErrorCorrectionWrapper(
        transformers.SegformerForSemanticSegmentation(config), error_channels=8, detail_channels=8
    )
    result = errwrap.finetune(
        wrap, DataLoader(train, batch_size=2), steps=2, precision="bf16", progress=False, log_every=None
    )
    assert result.step == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    assert all(p.dtype == torch.float32 for p in wrap.parameters())  # autocast: the weights stay fp32
    report = errwrap.evaluate(wrap, DataLoader(val, batch_size=2))
    assert report.num_images == 2 and 0 < report.num_pixels < 2 * 32 * 32

    # a 151-output model (class 0 = "other") is refused against the 150-class data, and fits reduce_zero_label=False
    with pytest.raises(ValueError, match="reduce_zero_label=False"):
        config151 = transformers.SegformerConfig(**{**config.to_dict(), "num_labels": 151})
        errwrap.evaluate(
            ErrorCorrectionWrapper(transformers.SegformerForSemanticSegmentation(config151)),
            DataLoader(val, batch_size=2),
        )
    assert ADE20K(tmp_path, "val", reduce_zero_label=False).num_classes == 151

    from errwrap.export import InferenceModule, export_onnx, export_program

    wrap.eval()
    x = torch.stack([val[0][0], val[1][0]])
    with torch.no_grad():
        eager = InferenceModule(wrap)(x)
        program = export_program(wrap, x)
        for a, b in zip(program.module()(x), eager, strict=False):
            assert torch.allclose(a, b, atol=1e-5)
        assert torch.equal(eager[0].argmax(1), wrap(x).labels)
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(export_onnx(wrap, tmp_path / "segformer.onnx", x)))
    logits, error_prob = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(logits, eager[0].numpy(), atol=1e-4) and np.allclose(error_prob, eager[1].numpy(), atol=1e-5)


# ---------------------------------------------------------------------------- 4. comparing error scores
class NoDropout(nn.Module):
    """A plain network without any dropout layer, returning logits at input size."""

    def __init__(self, classes=3, dropout_p=None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()
        )
        self.drop = nn.Dropout(dropout_p) if dropout_p is not None else nn.Identity()
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return nn.functional.interpolate(
            self.cls(self.drop(self.body(x))), size=x.shape[-2:], mode="bilinear", align_corners=False
        )


SIZES = ((32, 48), (40, 40), (48, 32), (36, 52))


class VariableSizes(torch.utils.data.Dataset):
    def __len__(self):
        return len(SIZES)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        h, w = SIZES[i]
        label = torch.randint(0, 3, (h, w), generator=g)
        label[:2] = 255
        return torch.rand(3, h, w, generator=g), label


def test_researcher_compares_scores_on_images_of_different_sizes(tmp_path):
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(NoDropout(), error_channels=8, detail_channels=8)
    with pytest.raises(RuntimeError, match="different sizes.*batch_size=1"):
        errwrap.evaluate(wrap, DataLoader(VariableSizes(), batch_size=2))
    report = errwrap.evaluate(
        wrap, DataLoader(VariableSizes(), batch_size=1), baselines=("msp", "entropy", "mc_dropout"), mc_dropout_T=4
    )
    assert report.num_images == 4 and report.num_pixels == sum(h * w - 2 * w for h, w in SIZES)
    det = report.error_detection
    assert list(det) == ["error_head", "msp", "entropy", "mc_dropout"]
    assert len({r.num_errors for r in det.values()}) == 1  # every score judges the same base errors
    # no dropout layer: dropout is inserted before the classifier, so MC dropout is not entropy again
    assert det["mc_dropout"].auroc != det["entropy"].auroc and det["mc_dropout"].auroc != det["msp"].auroc

    data = json.loads(report.to_json(tmp_path / "report.json"))
    assert set(data["error_detection"]["mc_dropout"]) >= {"auroc", "aupr_error", "aupr_success", "fpr95", "num_errors"}
    assert data["time_per_image"]["score/mc_dropout"] > data["time_per_image"]["score/msp"]
    assert "MCDropoutScore(T=4" in data["config"]["scores"]["mc_dropout"]
    assert EvaluationReport.from_json(tmp_path / "report.json").to_dict() == report.to_dict()


def test_mc_dropout_on_a_base_whose_dropout_layers_have_p_0_is_not_entropy_again():
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(NoDropout(dropout_p=0.0), error_channels=8, detail_channels=8).eval()
    x = torch.rand(2, 3, 32, 32)
    mc, entropy = errwrap.MCDropoutScore(T=4)(wrap, x).score, errwrap.EntropyScore()(wrap, x).score
    # T identical passes would give the entropy score to float precision (~1e-7)
    assert (mc - entropy).abs().max() > 1e-5


def test_mc_dropout_on_a_binary_base_without_dropout():
    torch.manual_seed(0)
    wrap = ErrorCorrectionWrapper(NoDropout(classes=1), error_channels=8, detail_channels=8)
    items = [(torch.rand(3, 32, 32), torch.randint(0, 2, (32, 32))) for _ in range(2)]
    report = errwrap.evaluate(
        wrap, DataLoader(items, batch_size=2), baselines=("entropy", "mc_dropout"), mc_dropout_T=3
    )
    assert report.error_detection["mc_dropout"].auroc != report.error_detection["entropy"].auroc


@pytest.mark.slow
@pytest.mark.optional
def test_binary_folder_example_runs(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "binary_folder.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "model"), "--steps", "1", "--crop", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 8 synthetic 64x64 masks, none ignored
    assert "errwrap evaluation: 8 images, 32768 labelled pixels" in result.stdout
    loaded = ErrorCorrectionWrapper.from_pretrained(tmp_path / "model")
    assert loaded.binary and loaded.class_names == ["background", "foreground"]


def test_model_card_says_how_images_are_normalised_and_whether_the_cli_can_load_it(tmp_path):
    from errwrap.models import DeepLabV3Plus

    torch.manual_seed(0)
    known = ErrorCorrectionWrapper(
        DeepLabV3Plus("resnet18", num_classes=3, aspp_channels=16, decoder_channels=16, low_level_channels=8),
        error_channels=8,
        detail_channels=8,
    )
    known.preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    card = known.save_pretrained(tmp_path / "known").joinpath("README.md").read_text()
    assert "normalised with mean [0.5, 0.5, 0.5] and std [0.25, 0.25, 0.25]" in card
    assert "errwrap predict --model REPO_ID" in card
    own = ErrorCorrectionWrapper(NoDropout(), error_channels=8, detail_channels=8)
    card = own.save_pretrained(tmp_path / "own").joinpath("README.md").read_text()
    assert "not normalised: RGB in [0, 1]" in card and "the errwrap CLI applies none either" in card
    assert "command line cannot rebuild this base network" in card and "errwrap predict" not in card
