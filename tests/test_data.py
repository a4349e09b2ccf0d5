import numpy as np
import pytest
import torch
from PIL import Image

from errwrap.data import (
    ADE20K,
    CITYSCAPES_LABEL_TO_TRAIN,
    Cityscapes,
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    Scenes,
    SegmentationFolder,
    make_loader,
)


def _save_rgb(path, h=6, w=8, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((h, w, 3), value, dtype=np.uint8)
    rgb[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 10
    Image.fromarray(rgb).save(path)


def _save_mask(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(path)


# ---------------------------------------------------------------------------- Cityscapes
def _cityscapes_tree(root):
    ids = np.array([[7, 8, 0, 26], [33, 24, 9, 11]], dtype=np.uint8)
    _save_rgb(root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png", 2, 4)
    _save_mask(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", ids)
    _save_mask(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_color.png", ids)  # ignored
    _save_rgb(root / "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png", 2, 4)
    _save_mask(root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png", np.zeros((2, 4)))
    _save_mask(
        root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png", [[0, 1, 18, 255], [5, 5, 40, 2]]
    )
    return ids


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    ids = _cityscapes_tree(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and len(ds.class_names) == 19 and ds.ignore_index == 255
    image, label = ds[0]
    assert image.shape == (3, 2, 4) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert label.dtype == torch.int64
    assert label.tolist() == [[0, 1, 255, 13], [18, 11, 255, 2]]
    expected = [[CITYSCAPES_LABEL_TO_TRAIN.get(int(v), 255) for v in row] for row in ids]
    assert label.tolist() == expected
    # labelTrainIds wins when present; values >= 19 other than 255 become 255.
    assert ds[1][1].tolist() == [[0, 1, 18, 255], [5, 5, 255, 2]]


def test_cityscapes_official_table():
    assert len(CITYSCAPES_LABEL_TO_TRAIN) == 19
    assert sorted(CITYSCAPES_LABEL_TO_TRAIN.values()) == list(range(19))
    assert (
        CITYSCAPES_LABEL_TO_TRAIN[7] == 0 and CITYSCAPES_LABEL_TO_TRAIN[17] == 5 and CITYSCAPES_LABEL_TO_TRAIN[33] == 18
    )
    assert all(k not in CITYSCAPES_LABEL_TO_TRAIN for k in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30))


def test_cityscapes_layout_errors_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val"):
        Cityscapes(tmp_path, "val")
    _cityscapes_tree(tmp_path)
    (tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="aachen_000000_000019_gtFine_labelIds.png"):
        Cityscapes(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        Cityscapes(tmp_path, "training")


# ---------------------------------------------------------------------------- ADE20K
def _ade_tree(root):
    base = root / "ADEChallengeData2016"
    _save_rgb(base / "images/training/ADE_train_00000001.jpg", 2, 3)
    _save_mask(base / "annotations/training/ADE_train_00000001.png", [[0, 1, 150], [2, 0, 75]])
    _save_rgb(base / "images/validation/ADE_val_00000001.jpg", 2, 3)
    _save_mask(base / "annotations/validation/ADE_val_00000001.png", [[3, 3, 3], [0, 0, 0]])


def test_ade20k_reduces_zero_label(tmp_path):
    _ade_tree(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = ADE20K(root, "train")
        assert len(ds) == 1 and ds.num_classes == 150 == len(ds.class_names)
        image, label = ds[0]
        assert image.shape == (3, 2, 3) and label.dtype == torch.int64
        assert label.tolist() == [[255, 0, 149], [1, 255, 74]]
    assert ADE20K(tmp_path, "val")[0][1].tolist() == [[2, 2, 2], [255, 255, 255]]


def test_ade20k_keeps_zero_label_for_151_class_models(tmp_path):
    _ade_tree(tmp_path)
    ds = ADE20K(tmp_path, "train", reduce_zero_label=False)
    assert ds.num_classes == 151 == len(ds.class_names) and ds.class_names[:2] == ["other", "wall"]
    assert ds[0][1].tolist() == [[0, 1, 150], [2, 0, 75]]
    assert ADE20K.num_classes == 150 and ADE20K(tmp_path, "train").num_classes == 150  # the class is untouched
    with pytest.raises(TypeError, match="reduce_zero_label"):
        ADE20K(tmp_path, "train", reduce_zero_label="no")


def test_ade20k_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images/training"):
        ADE20K(tmp_path, "train")
    _ade_tree(tmp_path)
    (tmp_path / "ADEChallengeData2016/annotations/training/ADE_train_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000001.png"):
        ADE20K(tmp_path, "train")


# ---------------------------------------------------------------------------- folders
def test_segmentation_folder_pairs_by_stem(tmp_path):
    for stem, value in (("b", 2), ("a", 1)):
        _save_rgb(tmp_path / f"img/{stem}.jpg", 4, 4)
        _save_mask(tmp_path / f"mask/{stem}.png", np.full((4, 4), value))
    ds = SegmentationFolder(tmp_path / "img", tmp_path / "mask", num_classes=3)
    assert [p[0].stem for p in ds.pairs] == ["a", "b"]
    assert ds[0][1].unique().tolist() == [1] and ds[1][1].unique().tolist() == [2]
    assert ds.class_names == ["0", "1", "2"] and ds.ignore_index == 255


def test_segmentation_folder_errors(tmp_path):
    _save_rgb(tmp_path / "img/a.png", 4, 4)
    _save_rgb(tmp_path / "img/only_image.png", 4, 4)
    _save_mask(tmp_path / "mask/a.png", np.full((4, 4), 7))
    _save_mask(tmp_path / "mask/only_mask.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"\['only_image'\].*\['only_mask'\]"):
        SegmentationFolder(tmp_path / "img", tmp_path / "mask")
    (tmp_path / "img/only_image.png").unlink()
    (tmp_path / "mask/only_mask.png").unlink()
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        SegmentationFolder(tmp_path / "img", tmp_path / "mask", num_classes=5)[0]
    _save_rgb(tmp_path / "mask/a.png", 4, 4)  # an RGB mask
    with pytest.raises(ValueError, match="single-channel"):
        SegmentationFolder(tmp_path / "img", tmp_path / "mask")[0]
    with pytest.raises(FileNotFoundError, match="nope"):
        SegmentationFolder(tmp_path / "nope", tmp_path / "mask")


def test_segmentation_folder_reads_jpeg_palette_gray_rgba_and_16_bit(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    gray16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)  # up to 61100: above 255
    Image.fromarray(rgb).save(tmp_path / "img/a_jpeg.jpg", quality=100)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "img/b_gray.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 8), 7, np.uint8)])).save(tmp_path / "img/c_rgba.png")
    Image.fromarray(gray16).save(tmp_path / "img/d_gray16.png")
    labels = rng.integers(0, 3, (6, 8)).astype(np.uint8)
    for stem in ("a_jpeg", "b_gray", "c_rgba"):
        palette = Image.fromarray(labels, mode="L").convert("P")
        palette.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10])  # colours must not leak into labels
        palette.save(tmp_path / f"mask/{stem}.png")
    Image.fromarray(np.dstack([labels] * 3)).save(tmp_path / "mask/d_gray16.png")  # gray mask saved as RGB
    ds = SegmentationFolder(tmp_path / "img", tmp_path / "mask", num_classes=3)
    assert [p[0].name for p in ds.pairs] == ["a_jpeg.jpg", "b_gray.png", "c_rgba.png", "d_gray16.png"]
    for image, label in ds:
        assert image.shape == (3, 6, 8) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and torch.equal(label, torch.from_numpy(labels.astype(np.int64)))
    assert torch.allclose(ds[1][0], torch.from_numpy(rgb[..., 0] / 255.0).float().expand(3, -1, -1))
    assert torch.allclose(ds[2][0], torch.from_numpy(rgb / 255.0).float().permute(2, 0, 1))  # alpha dropped
    assert torch.allclose(ds[3][0], torch.from_numpy(gray16 / 65535.0).float().expand(3, -1, -1))  # not clipped at 255
    assert float(ds[3][0].max()) == pytest.approx(61100 / 65535)


def test_segmentation_folder_explains_jpeg_masks_empty_dirs_and_missing_splits(tmp_path):
    _save_rgb(tmp_path / "img/a.png", 4, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="masks_dir: expected label images"):
        SegmentationFolder(tmp_path / "img", tmp_path / "empty")
    (tmp_path / "jpeg").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "jpeg/a.jpg")
    with pytest.raises(ValueError, match=r"JPEG/WebP \(\['a.jpg'\]\).*lossless"):
        SegmentationFolder(tmp_path / "img", tmp_path / "jpeg")
    (tmp_path / "cs/leftImg8bit/train/x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val, which does not exist \(.* holds \['train'\]\)"):
        Cityscapes(tmp_path / "cs", split="val")


# ---------------------------------------------------------------------------- transforms
def _coded_pair(h=20, w=28, seed=0):
    """An image whose first channel encodes the label, so alignment can be checked exactly."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 10, (h // 4, w // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    image = torch.stack([label.float() / 10, torch.rand(h, w, generator=g), torch.zeros(h, w)])
    return image, label


def test_flip_and_crop_keep_image_and_label_aligned():
    image, label = _coded_pair()
    t = Compose([RandomHorizontalFlip(p=1.0), RandomCrop((12, 16), generator=torch.Generator().manual_seed(1))])
    out_image, out_label = t(image, label)
    assert out_image.shape == (3, 12, 16) and out_label.shape == (12, 16)
    assert torch.equal((out_image[0] * 10).round().long(), out_label)
    assert not torch.equal(out_label, label[:12, :16])


def test_crop_pads_labels_with_ignore_index():
    image, label = _coded_pair(8, 8)
    out_image, out_label = RandomCrop(12, fill=0.5, ignore_index=255)(image, label)
    assert out_image.shape == (3, 12, 12)
    assert (out_label[8:, :] == 255).all() and (out_label[:, 8:] == 255).all()
    assert (out_image[:, 8:, :] == 0.5).all()
    assert torch.equal(out_label[:8, :8], label)


def test_scale_and_resize_keep_labels_integer_and_valid():
    image, label = _coded_pair()
    label[0, 0] = 255
    for t in (RandomScale(0.5, 2.0, generator=torch.Generator().manual_seed(3)), Resize((37, 11)), Resize(64)):
        out_image, out_label = t(image, label)
        assert out_label.dtype == torch.int64 and out_label.shape == out_image.shape[-2:]
        assert set(out_label.unique().tolist()) <= set(label.unique().tolist())
    _, out_label = Resize((40, 56))(image, label)  # 2x: nearest labels are the blocks, doubled
    assert torch.equal(out_label, label.repeat_interleave(2, 0).repeat_interleave(2, 1))
    _, out_label = Resize((10, 14))(image, label)  # 1/2: one pixel of each 2x2 cell
    assert torch.equal(out_label, label[1::2, 1::2]) or torch.equal(out_label, label[::2, ::2])


def test_random_transforms_repeat_with_a_generator():
    image, label = _coded_pair()

    def pipeline(seed):
        g = torch.Generator().manual_seed(seed)
        return Compose(
            [
                RandomScale(0.75, 1.5, generator=g),
                RandomCrop(16, generator=g),
                RandomHorizontalFlip(generator=g),
                ColorJitter(generator=g),
            ]
        )

    a, b, c = pipeline(5)(image, label), pipeline(5)(image, label), pipeline(6)(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_color_jitter_and_normalize_touch_only_the_image():
    image, label = _coded_pair()
    jittered, same = ColorJitter(0.4, 0.4, 0.4, generator=torch.Generator().manual_seed(0))(image, label)
    assert same is label and jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, image)
    normed, same = Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image, label)
    assert same is label and torch.allclose(normed, image * 2 - 1)
    with pytest.raises(ValueError, match="label"):
        Normalize()(image, label[1:])


# ---------------------------------------------------------------------------- loader
def test_make_loader_is_seeded():
    ds = Scenes(12, size=16)

    def first_labels(seed):
        return [b[1][:, 0, 0].tolist() for b in make_loader(ds, 4, seed=seed)]

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)
    ordered = make_loader(ds, 5, shuffle=False, drop_last=False)
    assert [len(b[0]) for b in ordered] == [5, 5, 2]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0)


# ---------------------------------------------------------------------------- binary 0/255 masks
def _binary_folder(root, n=2):
    for i in range(n):
        _save_rgb(root / "images" / f"im{i}.jpg", 4, 4)
        mask = np.zeros((4, 4), dtype=np.uint8)
        mask[1:3, 1:3] = 255
        _save_mask(root / "masks" / f"im{i}.png", mask)


def test_segmentation_folder_refuses_0_255_masks_without_a_label_map(tmp_path):
    _binary_folder(tmp_path)
    with pytest.raises(ValueError, match=r"only 0 and 255.*label_map=\{255: 1\}.*--label-map 255:1"):
        SegmentationFolder(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ValueError, match=r"label_map=\{255: 1\}"):
        SegmentationFolder(tmp_path / "images", tmp_path / "masks", num_classes=2)


def test_segmentation_folder_label_map_reads_255_as_foreground(tmp_path):
    _binary_folder(tmp_path)
    ds = SegmentationFolder(tmp_path / "images", tmp_path / "masks", num_classes=2, label_map={255: 1})
    label = ds[1][1]
    assert label.dtype == torch.int64 and label.sum() == 4 and label[1:3, 1:3].eq(1).all()
    assert sorted(label.unique().tolist()) == [0, 1]
    # {} keeps values as they are: 255 is then ignore_index, on purpose.
    kept = SegmentationFolder(tmp_path / "images", tmp_path / "masks", label_map={})
    assert (kept[0][1] == 255).sum() == 4
    # a map to ignore_index, and values left out of the map are kept
    _save_mask(tmp_path / "masks" / "im0.png", [[0, 1, 2, 7]] * 4)
    mapped = SegmentationFolder(tmp_path / "images", tmp_path / "masks", label_map={7: 255, 2: 0})
    assert mapped[0][1][0].tolist() == [0, 1, 0, 255]
    for bad, error in (({255: -1}, ValueError), ({"a": 1}, ValueError), ([(255, 1)], TypeError)):
        with pytest.raises(error, match="label_map"):
            SegmentationFolder(tmp_path / "images", tmp_path / "masks", label_map=bad)


def test_segmentation_folder_checks_every_mask_read_and_hints_at_label_map(tmp_path):
    _binary_folder(tmp_path)
    _save_mask(tmp_path / "masks" / "im0.png", [[0, 1, 1, 1]] * 4)  # the first mask is fine
    ds = SegmentationFolder(tmp_path / "images", tmp_path / "masks")
    assert ds[0][1].max() == 1
    with pytest.raises(ValueError, match="im1.png: the mask holds only 0 and 255"):
        ds[1]
    other_ignore = SegmentationFolder(tmp_path / "images", tmp_path / "masks", num_classes=2, ignore_index=254)
    with pytest.raises(ValueError, match=r"im1.png: label values \[255\].*label_map="):
        other_ignore[1]
