"""Segmentation datasets on their usual directory layouts: Cityscapes, ADE20K, and plain folders.

Each item is ``(image, label)``: image ``(3, H, W)`` float32 in ``[0, 1]`` (or whatever the joint
``transform`` makes of it), label ``(H, W)`` int64 with ``ignore_index`` (255) for unlabeled
pixels. Datasets expose ``num_classes``, ``class_names`` and ``ignore_index``. A wrong layout
raises ``FileNotFoundError`` naming the path that was expected.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN",
    "ADE20K_CLASSES",
    "SegmentationFolder",
    "Cityscapes",
    "ADE20K",
    "load_image",
    "load_mask",
]

JointTransform = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

#: The official Cityscapes table (cityscapesScripts ``labels.py``): label id -> train id; every
#: id not listed (0-6, 9, 10, 14-16, 18, 29, 30, and -1 license plate) maps to 255.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

_CITYSCAPES_LUT = np.full(256, 255, dtype=np.uint8)
for _label_id, _train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


#: Pillow modes of single-channel images with more than 8 bits (16-bit PNG/TIFF opens as these).
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: str | os.PathLike) -> Image.Image:
    """``Image.open`` that refuses images over Pillow's ``Image.MAX_IMAGE_PIXELS`` (decompression
    bombs: a small file that decodes to gigabytes) with a ``ValueError`` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{found.group(1)} pixels" if found else "too many pixels"
        raise ValueError(
            f"{path}: {pixels}, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS); "
            "refused as "
            "a possible decompression bomb. Raise that limit for an image you trust"
        ) from None


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as RGB, ``(3, H, W)`` float32 in ``[0, 1]``.

    8-bit images of any mode (``RGB``, ``RGBA``: alpha dropped, ``L``, ``P``, ``CMYK``, ...) are
    divided by 255; 16-bit grayscale (``I;16``, or ``I`` with values up to 65535) by 65535
    (Pillow's own ``convert("RGB")`` would clip them at 255 and saturate the image).
    Floating-point (``F``) images must already hold values in ``[0, 1]``.
    """
    with _open(path) as im:
        if im.mode in _WIDE_GRAY_MODES or im.mode == "F":
            gray = np.asarray(im).astype(np.float32)
            if im.mode == "F":
                if gray.size and (gray.min() < 0.0 or gray.max() > 1.0):
                    raise ValueError(
                        f"{path}: a floating-point (mode F) image: expected values in [0, 1], got [{gray.min()}, "
                        f"{gray.max()}]"
                    )
            elif gray.size and (gray.min() < 0 or gray.max() > 65535):
                raise ValueError(
                    f"{path}: a 32-bit integer (mode I) image: expected values in [0, 65535], got [{gray.min()}, "
                    f"{gray.max()}]"
                )
            else:
                gray /= 65535.0
            return torch.from_numpy(np.ascontiguousarray(gray))[None].expand(3, -1, -1).contiguous()
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label image (``L``, ``P``, ``I``, ``I;16`` or ``1``) as an ``(H, W)``
    int64 array. A palette (``P``) mask gives its palette indices, not its colours; an ``RGB`` or
    ``RGBA`` mask is accepted when its three colour channels are equal (a grayscale mask saved as
    RGB), and refused otherwise (colour-coded masks must be mapped to class indices first)."""
    with _open(path) as im:
        if im.mode in ("RGB", "RGBA"):
            rgb = np.asarray(im.convert("RGB"))
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
                return rgb[..., 0].astype(np.int64)
            raise ValueError(
                f"{path}: expected a single-channel label image (mode L, P, I or I;16), got a colour-coded {im.mode} "
                "mask; "
                "map each colour to its class index and save the indices as an L or P PNG"
            )
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(
                f"{path}: expected a single-channel label image (mode L, P, I or I;16), got mode {im.mode}"
            )
        return np.asarray(im).astype(np.int64)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        found = f" ({path.parent} holds {siblings[:10]})" if siblings else ""
        raise FileNotFoundError(f"{what}: expected the directory {path}, which does not exist{found}")


def _check_label_map(label_map: Mapping[int, int] | None) -> dict[int, int] | None:
    if label_map is None:
        return None
    if not isinstance(label_map, Mapping):
        raise TypeError(
            "label_map: expected a mapping of raw mask values to class indices (e.g. {255: 1}), got "
            f"{type(label_map).__name__}"
        )
    checked: dict[int, int] = {}
    for key, value in label_map.items():
        for item in (key, value):
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or item < 0:
                raise ValueError(
                    f"label_map: expected non-negative integer values and classes (e.g. {{255: 1}}), got {key!r}: "
                    f"{value!r}"
                )
        checked[int(key)] = int(value)
    return checked


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split: expected one of {list(allowed)}, got {split!r}")


class _PairDataset(Dataset):
    """Shared item loading for datasets of ``(image path, label path)`` pairs."""

    num_classes: int | None
    class_names: list[str] | None
    ignore_index: int

    def __init__(self, pairs: list[tuple[Path, Path]], transform: JointTransform | None) -> None:
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return raw

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        image = load_image(image_path)
        label = torch.from_numpy(self._labels(load_mask(label_path), label_path))
        if label.shape != image.shape[-2:]:
            raise ValueError(
                f"{label_path}: label of size {tuple(label.shape)}, but its image {image_path.name} is "
                f"{tuple(image.shape[-2:])}"
            )
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


class SegmentationFolder(_PairDataset):
    """Images in one directory and label masks in another, paired by file stem.

    Args:
        images_dir: the images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.webp``), read
            with :func:`load_image` (any 8-bit mode, 16-bit grayscale).
        masks_dir: label images with the same stems (``.png``, ``.bmp``, ``.tif``; not JPEG),
            read with :func:`load_mask` (``L``, palette ``P``: its indices, 16-bit, or an ``RGB``
            mask whose channels are equal).
        num_classes: when given, each mask is checked to hold only ``0..num_classes-1`` and
            ``ignore_index``.
        ignore_index: label value of unlabeled pixels.
        class_names: optional names (length ``num_classes``).
        transform: a joint transform ``(image, label) -> (image, label)``.
        label_map: raw mask value -> class index (or ``ignore_index``), applied to every mask
            before the checks; values not in it are kept. Binary masks saved as 0/255 (255 =
            foreground) need ``label_map={255: 1}``; an empty mapping ``{}`` keeps every value
            as it is and turns off the 0/255 check below.

    Masks of only 0 and ``ignore_index`` (the usual 0/255 binary masks, with the default
    ``ignore_index=255``) would make every foreground pixel "unlabelled", and a model would be
    trained and evaluated on background alone; without a ``label_map`` such a mask raises
    ``ValueError`` naming the fix (checked on the first mask when the dataset is built, and on
    every mask read).

    Raises:
        FileNotFoundError: a directory is missing or empty.
        ValueError: some stems have an image but no mask, or a mask but no image (listed), or
            masks are JPEG, or the first mask is a 0/255 mask and no ``label_map`` is given.

    Example:
        >>> ds = SegmentationFolder("images", "masks", num_classes=2, label_map={255: 1})  # doctest: +SKIP
        >>> image, label = ds[0]  # label values 0 (background) and 1 (foreground)           # doctest: +SKIP
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike,
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        transform: JointTransform | None = None,
        label_map: Mapping[int, int] | None = None,
    ) -> None:
        images_dir, masks_dir = Path(images_dir), Path(masks_dir)
        self.label_map = _check_label_map(label_map)
        _require_dir(images_dir, "images_dir")
        _require_dir(masks_dir, "masks_dir")
        images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() in MASK_EXTENSIONS}
        if not images:
            raise FileNotFoundError(
                f"images_dir: expected image files ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}, found none"
            )
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        lossy = sorted(
            p.name for p in masks_dir.iterdir() if p.stem in no_mask and p.suffix.lower() in (".jpg", ".jpeg", ".webp")
        )
        if lossy:
            raise ValueError(
                f"masks_dir: {len(lossy)} mask(s) are JPEG/WebP ({lossy[:5]}); lossy compression changes label values "
                "at "
                f"edges, so masks must be lossless ({', '.join(MASK_EXTENSIONS)})"
            )
        if not masks:
            raise FileNotFoundError(
                f"masks_dir: expected label images ({', '.join(MASK_EXTENSIONS)}) in {masks_dir}, found none"
            )
        if no_mask or no_image:
            raise ValueError(
                f"images and masks must pair by file stem; {len(no_mask)} image(s) without a mask in {masks_dir}: "
                f"{no_mask[:10]}"
                f"{' ...' if len(no_mask) > 10 else ''}; {len(no_image)} mask(s) without an image in {images_dir}: "
                f"{no_image[:10]}"
                f"{' ...' if len(no_image) > 10 else ''}"
            )
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        super().__init__([(images[s], masks[s]) for s in sorted(images)], transform)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            list(class_names)
            if class_names is not None
            else ([str(i) for i in range(num_classes)] if num_classes else None)
        )
        first = self.pairs[0][1]
        self._labels(load_mask(first), first)  # a 0/255 binary dataset fails here, not mid-training

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if self.label_map:
            mapped = raw.copy()
            for value, target in self.label_map.items():
                mapped[raw == value] = target
            raw = mapped
        elif self.label_map is None and self.ignore_index not in (0, 1):
            values = np.unique(raw)
            if len(values) == 2 and values[0] == 0 and values[1] == self.ignore_index:
                raise ValueError(
                    f"{path}: the mask holds only 0 and {self.ignore_index}, and {self.ignore_index} is ignore_index, "
                    "so every "
                    f"non-zero pixel would be unlabelled and only background would be learnt. For a binary mask with "
                    f"{self.ignore_index} = foreground pass label_map={{{self.ignore_index}: 1}} (errwrap CLI: "
                    "--label-map "
                    f"{self.ignore_index}:1); if {self.ignore_index} really marks unlabelled pixels, pass "
                    "label_map={}"
                )
        if self.num_classes is not None:
            bad = (raw >= self.num_classes) & (raw != self.ignore_index) | (raw < 0)
            if bad.any():
                bad_values = sorted(set(np.unique(raw[bad]).tolist()))[:10]
                hint = (
                    "; map raw values to class indices with label_map= (e.g. {255: 1} for 0/255 binary masks)"
                    if not self.label_map
                    else ""
                )
                raise ValueError(
                    f"{path}: label values {bad_values} are neither in 0..{self.num_classes - 1} nor "
                    f"ignore_index={self.ignore_index}{hint}"
                )
        return raw


class Cityscapes(_PairDataset):
    """Cityscapes fine annotations, 19 training classes (255: ignored).

    Layout (as downloaded from cityscapes-dataset.com)::

        root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
        root/gtFine/{split}/{city}/{name}_gtFine_labelIds.png       (or _labelTrainIds.png)

    ``*_gtFine_labelTrainIds.png`` (written by cityscapesScripts' ``createTrainIdLabelImgs``) is
    used when present; otherwise ``*_gtFine_labelIds.png`` is mapped with the official table
    :data:`CITYSCAPES_LABEL_TO_TRAIN`.

    Args:
        root: the directory that holds ``leftImg8bit`` and ``gtFine``.
        split: ``"train"``, ``"val"`` or ``"test"`` (test labels are not public: all ignored).
        transform: a joint transform.
    """

    num_classes = 19
    class_names = list(CITYSCAPES_CLASSES)
    ignore_index = 255

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: JointTransform | None = None) -> None:
        _check_split(split, ("train", "val", "test"))
        root = Path(root)
        image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
        _require_dir(image_root, "Cityscapes images")
        _require_dir(label_root, "Cityscapes labels")
        pairs, missing = [], []
        for image in sorted(image_root.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            city = label_root / image.parent.name
            train_ids, label_ids = city / f"{stem}_gtFine_labelTrainIds.png", city / f"{stem}_gtFine_labelIds.png"
            if train_ids.is_file():
                pairs.append((image, train_ids))
            elif label_ids.is_file():
                pairs.append((image, label_ids))
            else:
                missing.append(str(label_ids))
        if not pairs and not missing:
            raise FileNotFoundError(
                f"Cityscapes images: expected files {image_root}/<city>/*_leftImg8bit.png, found none"
            )
        if missing:
            raise FileNotFoundError(
                f"Cityscapes labels: {len(missing)} image(s) have no label; expected e.g. {missing[0]} (or "
                "*_gtFine_labelTrainIds.png)"
            )
        super().__init__(pairs, transform)

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if path.name.endswith("_labelTrainIds.png"):
            return np.where(raw < self.num_classes, raw, self.ignore_index)
        return _CITYSCAPES_LUT[np.clip(raw, 0, 255)].astype(np.int64)


class ADE20K(_PairDataset):
    """ADE20K scene parsing (SceneParsing / ADEChallengeData2016), 150 classes.

    Layout::

        root/images/{training,validation}/ADE_*.jpg
        root/annotations/{training,validation}/ADE_*.png

    ``root`` may be ``ADEChallengeData2016`` itself or the directory that holds it. By default
    label 0 ("other") becomes 255 (ignored) and every other label ``k`` becomes ``k - 1``
    ("reduce zero label", as in the usual DeepLabv3+ / mmsegmentation setting, and as
    transformers' ``do_reduce_labels=True``): 150 classes, which is what SegFormer, UperNet and
    the other ADE20K checkpoints with 150 labels predict. A model with 151 outputs, whose class 0
    is "other", needs ``reduce_zero_label=False``: labels stay ``0..150`` (151 classes, the first
    named ``"other"``). Either way values above 150 become 255.

    Args:
        root: see above.
        split: ``"train"`` (``training``) or ``"val"`` (``validation``).
        transform: a joint transform.
        reduce_zero_label: ignore label 0 and shift the others down by one (150 classes);
            ``False``: keep 0 as the class ``"other"`` (151 classes).
    """

    num_classes = 150
    class_names = list(ADE20K_CLASSES)
    ignore_index = 255

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: JointTransform | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        _check_split(split, ("train", "val"))
        if not isinstance(reduce_zero_label, bool):
            raise TypeError(f"reduce_zero_label: expected True or False, got {reduce_zero_label!r}")
        self.reduce_zero_label = reduce_zero_label
        if not reduce_zero_label:
            self.num_classes = len(ADE20K_CLASSES) + 1
            self.class_names = ["other", *ADE20K_CLASSES]
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        folder = {"train": "training", "val": "validation"}[split]
        image_root, label_root = root / "images" / folder, root / "annotations" / folder
        _require_dir(image_root, "ADE20K images")
        _require_dir(label_root, "ADE20K annotations")
        images = sorted(image_root.glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"ADE20K images: expected files {image_root}/*.jpg, found none")
        missing = [str(label_root / f"{p.stem}.png") for p in images if not (label_root / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(
                f"ADE20K annotations: {len(missing)} image(s) have no annotation; expected e.g. {missing[0]}"
            )
        super().__init__([(p, label_root / f"{p.stem}.png") for p in images], transform)

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if not self.reduce_zero_label:
            return np.where(raw >= self.num_classes, self.ignore_index, raw)
        return np.where((raw == 0) | (raw > self.num_classes), self.ignore_index, raw - 1)
