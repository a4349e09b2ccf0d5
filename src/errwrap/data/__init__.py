"""Data for training and evaluating errwrap models: datasets on their usual layouts, joint
image/label transforms, built-in generated families (:class:`Scenes`, :class:`Aerial`,
:class:`Cells`, by name in :data:`GENERATED`), the :class:`Corrupt` shifts, and :func:`make_loader`."""

from .aerial import AERIAL_CLASSES, Aerial, render_aerial
from .cells import CELL_CLASSES, Cells, render_cells
from .corruptions import CORRUPTIONS, Corrupt
from .datasets import (
    ADE20K,
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN,
    Cityscapes,
    SegmentationFolder,
    load_image,
    load_mask,
)
from .loader import make_loader
from .registry import GENERATED, generated
from .scenes import SCENE_CLASSES, Scenes, render_scene
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
)

__all__ = [
    "Cityscapes",
    "ADE20K",
    "SegmentationFolder",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN",
    "ADE20K_CLASSES",
    "load_image",
    "load_mask",
    "Scenes",
    "SCENE_CLASSES",
    "render_scene",
    "make_loader",
    "Compose",
    "Resize",
    "RandomScale",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "Normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Aerial",
    "AERIAL_CLASSES",
    "render_aerial",
    "Cells",
    "CELL_CLASSES",
    "render_cells",
    "GENERATED",
    "generated",
    "Corrupt",
    "CORRUPTIONS",
]
