import warnings

import pytest
import torch

from errwrap import ErrorCorrectionWrapper
from errwrap.data import IMAGENET_MEAN, IMAGENET_STD, Normalize, Scenes, make_loader
from errwrap.training import finetune
from errwrap.training.augment import PhotometricAugment, build_augment

from .tiny import tiny_base

NUM_CLASSES = len(Scenes.class_names)


def _normalised(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std, mean, std


def test_a_fixed_gain_darkens_pixels_exactly_through_the_normalisation():
    raw = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images, mean, std = _normalised(raw)
    aug = PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD, p=1.0, gain=(0.5, 0.5), gamma=(2.0, 2.0),
                             contrast=(1.0, 1.0), saturation=(1.0, 1.0))  # fmt: skip
    out = aug(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out * std + mean, 0.5 * raw**2, rtol=1e-5, atol=1e-6)


def test_pixels_stay_in_range_dtype_is_kept_and_the_generator_decides():
    raw = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images, mean, std = _normalised(raw)
    aug = PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD)
    a = aug(images, torch.Generator().manual_seed(5))
    b = aug(images, torch.Generator().manual_seed(5))
    c = aug(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    changed = (a != images).flatten(1).any(dim=1)
    assert 0 < int(changed.sum()) < 16  # p = 0.5: some images changed, others untouched
    assert torch.equal(a[~changed], images[~changed])
    half = aug(images.bfloat16(), torch.Generator().manual_seed(5))
    assert half.dtype == torch.bfloat16 and half.shape == images.shape
    assert torch.equal(PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD, p=0.0)(images, torch.Generator()), images)


def test_one_channel_images_and_bad_arguments():
    grey = torch.rand(4, 1, 8, 8)
    out = PhotometricAugment([0.0], [1.0], p=1.0)(grey, torch.Generator().manual_seed(0))
    assert out.shape == grey.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        PhotometricAugment(IMAGENET_MEAN, IMAGENET_STD)(grey, torch.Generator())
    with pytest.raises(ValueError, match="p: expected a probability"):
        PhotometricAugment([0.0], [1.0], p=1.5)
    with pytest.raises(ValueError, match="gamma: expected a range"):
        PhotometricAugment([0.0], [1.0], gamma=(1.2, 0.8))
    with pytest.raises(ValueError, match="std positive"):
        PhotometricAugment([0.0], [0.0])


def test_the_normalisation_comes_from_the_wrapper_or_from_pixels_in_the_unit_range():
    wrap = ErrorCorrectionWrapper(tiny_base(0, num_classes=NUM_CLASSES), error_channels=8, detail_channels=8)
    images, _, _ = _normalised(torch.rand(2, 3, 8, 8))
    assert build_augment(None, wrap, images) is None
    with pytest.raises(ValueError, match="augment: expected one of"):
        build_augment("colour", wrap, images)
    unit = build_augment("photometric", wrap, torch.rand(2, 3, 8, 8))
    assert unit is not None and unit.mean == (0.0, 0.0, 0.0) and unit.std == (1.0, 1.0, 1.0)
    raw = torch.zeros(2, 3, 8, 8)
    raw[0, :, 0, 0], raw[1, :, 0, 1] = 1.0, 0.0  # pixels that span [0, 1] in every channel
    raw[0, :, 1, 1] = 0.5
    normalised, _, _ = _normalised(raw.clamp(0, 1))
    with pytest.warns(UserWarning, match=r"guessed from the first batch's range") as record:
        guessed = build_augment("photometric", wrap, normalised)
    assert record[0].filename == __file__  # points at the caller's line, not into errwrap
    assert guessed is not None
    torch.testing.assert_close(torch.tensor(guessed.mean), torch.tensor(IMAGENET_MEAN), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(guessed.std), torch.tensor(IMAGENET_STD), rtol=1e-5, atol=1e-6)
    flat = torch.full((2, 3, 8, 8), 3.0)
    with pytest.warns(UserWarning, match="a channel of the first batch is constant; training without augmentation"):
        assert build_augment("photometric", wrap, flat) is None
    wrap.preprocessing = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorded = build_augment("photometric", wrap, images)
    assert recorded is not None and recorded.mean == tuple(IMAGENET_MEAN)


def test_finetune_augments_by_default_and_not_with_none():
    def run(**kwargs):
        torch.manual_seed(0)
        wrap = ErrorCorrectionWrapper(tiny_base(0, num_classes=NUM_CLASSES), error_channels=8, detail_channels=8)
        data = Scenes(8, size=32, seed=0, transform=Normalize(), cache=True)
        history = finetune(wrap, make_loader(data, 4, seed=0), steps=3, log_every=None, progress=False, **kwargs)
        return [h["loss"] for h in history.history], wrap.preprocessing

    default, pre = run()
    again, _ = run()
    plain, _ = run(augment=None)
    assert pre == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert default == again  # repeatable
    assert default != plain  # the default changed what the heads saw
    with pytest.raises(ValueError, match="augment: expected one of"):
        run(augment="colour")


def test_a_torchvision_normalize_is_recorded_for_the_augmentation():
    from torch.utils.data import DataLoader
    from torchvision import transforms as tv

    from errwrap.training._setup import _record_preprocessing

    class Images(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.transform(torch.rand(3, 8, 8)), torch.zeros(8, 8, dtype=torch.long)

    for transform in (
        tv.Compose([tv.RandomHorizontalFlip(), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
        tv.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ):
        wrap = ErrorCorrectionWrapper(tiny_base(0, num_classes=NUM_CLASSES), error_channels=8, detail_channels=8)
        _record_preprocessing(wrap, DataLoader(Images(transform), batch_size=2))
        assert wrap.preprocessing == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    wrap = ErrorCorrectionWrapper(tiny_base(0, num_classes=NUM_CLASSES), error_channels=8, detail_channels=8)
    _record_preprocessing(wrap, DataLoader(Images(tv.Normalize(0.5, 0.25)), batch_size=2))  # scalars: not recorded
    assert wrap.preprocessing is None


def test_finetune_guesses_unknown_normalisation_once_and_says_so_at_the_callers_line():
    wrap = ErrorCorrectionWrapper(tiny_base(0, num_classes=NUM_CLASSES), error_channels=8, detail_channels=8)
    g = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": (torch.rand(2, 3, 32, 32, generator=g) - 0.45) / 0.226,
         "labels": torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)}
        for _ in range(3)
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="guessed from the first batch's range") as record:
        finetune(wrap, data, steps=3, log_every=None, progress=False)
    guesses = [r for r in record if "guessed" in str(r.message)]
    assert len(guesses) == 1 and guesses[0].filename == __file__
    assert wrap.preprocessing is None  # a guess is not recorded as the model's preprocessing
