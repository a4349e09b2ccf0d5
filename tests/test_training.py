import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from errwrap import ErrorCorrectionLoss, ErrorCorrectionWrapper
from errwrap.data import RandomHorizontalFlip, Scenes, make_loader
from errwrap.training import FinetuneResult, NonFiniteLossError, finetune, load_checkpoint_weights, lr_factor

from .tiny import tiny_base

NUM_CLASSES = len(Scenes.class_names)
TERMS = ("loss", "error", "detail", "fused", "base")


def _wrapper(seed=0):
    torch.manual_seed(seed)
    return ErrorCorrectionWrapper(tiny_base(seed, num_classes=NUM_CLASSES), error_channels=8, detail_channels=8)


def _loader(n=12, size=32, batch_size=4, seed=0, transform=None):
    return make_loader(Scenes(n, size=size, seed=seed, transform=transform, cache=True), batch_size, seed=seed)


def _heads(wrapper):
    return {k: v.detach().clone() for k, v in wrapper.state_dict().items() if not k.startswith("base.")}


class StopAfter:
    """A loader that raises after ``n`` batches (a run killed mid-way)."""

    def __init__(self, loader, n):
        self.loader, self.n, self.seen = loader, n, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            if self.seen == self.n:
                raise KeyboardInterrupt("killed")
            self.seen += 1
            yield batch


def test_lr_schedule():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 10, 4, "poly") == 1.0 and lr_factor(4, 10, 4, "cosine") == 1.0
    assert lr_factor(7, 10, 4, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 4) == 0.0
    result = finetune(_wrapper(), _loader(), steps=4, lr=0.01, warmup_steps=2, schedule="cosine", log_every=None)
    assert [round(h["lr"], 6) for h in result.history] == [0.005, 0.01, 0.01, 0.005]


def test_frozen_finetuning_lowers_losses_and_keeps_the_base_bitwise(tmp_path):
    wrapper = _wrapper()
    base_before = {k: v.clone() for k, v in wrapper.base.state_dict().items()}
    images, labels = next(iter(_loader(n=8, batch_size=8, seed=7)))
    loss_fn = ErrorCorrectionLoss()

    def losses():
        wrapper.eval()
        with torch.no_grad():
            return loss_fn(wrapper(images), labels)

    before = losses()
    result = finetune(
        wrapper, _loader(n=32), steps=30, lr=2e-2, warmup_steps=2, checkpoint_dir=tmp_path, log_every=None
    )
    after = losses()  # on a batch of held-out images (seed 7)
    assert isinstance(result, FinetuneResult) and result.step == 30 and len(result.history) == 30
    assert after.error < before.error - 0.2, (before, after)
    assert after.fused < before.fused - 0.1, (before, after)
    for k, v in wrapper.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert wrapper.base_frozen and not wrapper.training  # the caller's mode (eval, set above) is kept
    saved = load_file(str(result.checkpoint / "model.safetensors"))
    assert result.checkpoint.name == "step-000030" and (tmp_path / "latest").read_text().strip() == "step-000030"
    assert not any(k.startswith("base.") for k in saved) and set(saved) == set(_heads(wrapper))
    assert all(math.isfinite(h[t]) for h in result.history for t in TERMS)
    assert all(h["images_per_s"] > 0 for h in result.history)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    flip = RandomHorizontalFlip()  # draws from torch's global RNG: resume must restore it
    kwargs = dict(steps=6, accumulate=2, lr=3e-3, warmup_steps=2, seed=3, checkpoint_every=2, log_every=None)
    # 12 images / batch 4 = 3 batches an epoch; 2 batches a step: checkpoints fall mid-epoch.

    def noisy(wrapper):  # like dropout: the model draws from the RNG too
        wrapper.error_head.register_forward_hook(lambda m, a, out: out + 0.1 * torch.randn_like(out))
        return wrapper

    full_wrapper = noisy(_wrapper())
    full = finetune(full_wrapper, _loader(transform=flip), checkpoint_dir=tmp_path / "full", **kwargs)

    wrapper = noisy(_wrapper())
    with pytest.raises(KeyboardInterrupt):
        finetune(wrapper, StopAfter(_loader(transform=flip), 7), checkpoint_dir=tmp_path / "cut", **kwargs)
    assert (tmp_path / "cut/latest").read_text().strip() == "step-000002"
    resumed_wrapper = noisy(_wrapper())  # same (frozen) base, other heads: the heads must come from the checkpoint
    with torch.no_grad():
        for p in resumed_wrapper.head_parameters():
            p.add_(1.0)
    resumed = finetune(
        resumed_wrapper, _loader(transform=flip), checkpoint_dir=tmp_path / "cut", resume="latest", **kwargs
    )

    assert resumed.step == full.step == 6 and len(resumed.history) == 6
    for a, b in zip(full.history, resumed.history, strict=False):
        for key in (*TERMS, "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    full_heads, resumed_heads = _heads(full_wrapper), _heads(resumed_wrapper)
    for k in full_heads:
        torch.testing.assert_close(resumed_heads[k], full_heads[k], rtol=1e-5, atol=1e-6)


def test_resume_from_an_explicit_directory_and_a_finished_run(tmp_path):
    wrapper = _wrapper()
    finetune(wrapper, _loader(), steps=3, checkpoint_dir=tmp_path, log_every=None)
    resumed = _wrapper(seed=5)
    again = finetune(resumed, _loader(), steps=3, resume=tmp_path / "step-000003", log_every=None)
    assert again.step == 3 and len(again.history) == 3  # nothing left to do
    assert resumed.temperature == pytest.approx(wrapper.temperature, rel=1e-6)  # fitted again, the same
    with pytest.raises(FileNotFoundError, match="state.pt"):
        finetune(_wrapper(), _loader(), steps=3, resume=tmp_path / "missing")
    fresh = finetune(_wrapper(), _loader(), steps=1, checkpoint_dir=tmp_path / "empty", resume="latest", log_every=None)
    assert fresh.step == 1


def test_resume_from_a_checkpoint_file_or_the_latest_pointer(tmp_path):
    finetune(_wrapper(), _loader(), steps=2, checkpoint_dir=tmp_path, log_every=None)
    for resume in (
        tmp_path / "step-000002" / "model.safetensors",
        tmp_path / "step-000002" / "state.pt",
        tmp_path / "latest",
    ):
        again = finetune(_wrapper(seed=5), _loader(), steps=2, resume=resume, log_every=None)
        assert again.step == 2 and again.checkpoint == tmp_path / "step-000002"


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    wrapper = _wrapper()
    heads = _heads(wrapper)
    with pytest.raises(NotADirectoryError, match="checkpoint_dir: expected a directory"):
        finetune(wrapper, _loader(), steps=1, checkpoint_dir=tmp_path / "notes.txt", log_every=None)
    assert all(torch.equal(v, heads[k]) for k, v in _heads(wrapper).items())  # nothing trained
    # an existing directory with the user's own files is fine, and they are left alone
    result = finetune(_wrapper(), _loader(), steps=1, checkpoint_dir=tmp_path, log_every=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "notes.txt", "step-000001"]
    assert (tmp_path / "notes.txt").read_text() == "mine" and result.checkpoint == tmp_path / "step-000001"


def test_user_loaders_of_tuples_lists_and_dicts_with_common_keys_train_the_same():
    dataset = Scenes(6, size=32, cache=True)
    images = torch.stack([dataset[i][0] for i in range(6)])
    labels = torch.stack([dataset[i][1] for i in range(6)])
    # three batches of 2, 2 and a last partial one of 1 image; labels as (B, 1, H, W) uint8 in some forms
    chunks = [(images[:2], labels[:2]), (images[2:4], labels[2:4]), (images[4:5], labels[4:5])]
    forms = {
        "tuple": [(x, y) for x, y in chunks],
        "list + name": [[x, y, "names"] for x, y in chunks],
        "image/mask": [{"image": x, "mask": y[:, None].to(torch.uint8)} for x, y in chunks],
        "pixel_values/labels": [{"pixel_values": x, "labels": y.int()} for x, y in chunks],
    }
    results = {
        name: finetune(_wrapper(), batches, steps=2, accumulate=2, log_every=None) for name, batches in forms.items()
    }
    reference = [h["loss"] for h in results["tuple"].history]
    assert len(reference) == 2 and all(math.isfinite(v) for v in reference)
    for name, result in results.items():
        assert [h["loss"] for h in result.history] == pytest.approx(reference, rel=1e-6), name
    with pytest.raises(ValueError, match=r"keys 'image' and 'label'.*got keys \['x', 'y'\]"):
        finetune(_wrapper(), [{"x": images[:2], "y": labels[:2]}], steps=1)


def test_images_of_another_float_dtype_run_in_the_model_dtype():
    dataset = Scenes(4, size=32, cache=True)
    images = torch.stack([dataset[i][0] for i in range(4)])
    labels = torch.stack([dataset[i][1] for i in range(4)])
    reference = finetune(_wrapper(), [(images, labels)], steps=2, log_every=None)
    as_double = finetune(_wrapper(), [(images.double(), labels)], steps=2, log_every=None)
    assert [h["loss"] for h in as_double.history] == pytest.approx([h["loss"] for h in reference.history], rel=1e-5)
    bf16 = _wrapper().to(torch.bfloat16)
    result = finetune(bf16, [(images, labels)], steps=1, log_every=None)  # float32 images, bfloat16 model
    assert math.isfinite(result.history[0]["loss"])
    with pytest.raises(TypeError, match="train_loader images: expected a floating-point tensor.*got ndarray"):
        finetune(_wrapper(), [(images.numpy(), labels)], steps=1)
    with pytest.raises(TypeError, match=r"train_loader images.*dtype torch.uint8; convert integer images"):
        finetune(_wrapper(), [((images * 255).to(torch.uint8), labels)], steps=1)


def test_non_finite_loss_stops_with_step_and_term_and_keeps_the_checkpoint(tmp_path):
    wrapper = _wrapper()
    calls = {"n": 0}

    def inject_nan(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    wrapper.error_head.register_forward_hook(inject_nan)
    with pytest.raises(NonFiniteLossError, match=r"step 3: term 'error'") as info:
        finetune(wrapper, _loader(), steps=5, checkpoint_dir=tmp_path, checkpoint_every=1, log_every=None)
    assert isinstance(info.value, FloatingPointError)
    assert info.value.step == 3 and info.value.term == "error" and info.value.checkpoint.name == "step-000002"
    assert (tmp_path / "latest").read_text().strip() == "step-000002"
    assert not (tmp_path / "step-000003").exists() and not (tmp_path / "step-000003.tmp").exists()
    # The optimizer did not step at step 3: the heads are still those of the step-2 checkpoint.
    # (Norm statistics did see the failing batch, so the parameters are compared, not buffers.)
    fresh = _wrapper(seed=1)
    load_checkpoint_weights(fresh, tmp_path / "step-000002")
    current, loaded = dict(wrapper.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.equal(current[k], loaded[k]) for k in current if not k.startswith("base."))


def test_detail_nan_is_named_detail():
    wrapper = _wrapper()
    wrapper.detail_head.register_forward_hook(lambda m, a, out: out * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: term 'detail'"):
        finetune(wrapper, _loader(), steps=2, log_every=None)


def test_joint_training_unfreezes_and_saves_the_base(tmp_path):
    wrapper = _wrapper()
    base_before = {k: v.clone() for k, v in wrapper.base.named_parameters()}
    result = finetune(
        wrapper, _loader(), steps=3, loss=ErrorCorrectionLoss(w_base=1.0), checkpoint_dir=tmp_path, log_every=None
    )
    assert not wrapper.base_frozen
    assert any(not torch.equal(p, base_before[k]) for k, p in wrapper.base.named_parameters())
    assert all(h["base"] > 0 for h in result.history)
    assert any(k.startswith("base.") for k in load_file(str(result.checkpoint / "model.safetensors")))
    # and back: a heads-only loss freezes it again.
    finetune(wrapper, _loader(), steps=1, log_every=None)
    assert wrapper.base_frozen


def test_bf16_autocast_on_cpu_and_fp16_refused():
    wrapper = _wrapper()
    dtypes = []
    wrapper.detail_head.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    result = finetune(wrapper, _loader(), steps=2, precision="bf16", log_every=None, calibrate=False)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert all(p.dtype == torch.float32 for p in wrapper.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            finetune(_wrapper(), _loader(), steps=1, precision="fp16")


def test_dict_batches_and_bad_arguments():
    dataset = Scenes(8, size=32)
    dict_loader = torch.utils.data.DataLoader([{"image": i, "label": lab} for i, lab in dataset], batch_size=4)
    assert finetune(_wrapper(), dict_loader, steps=2, log_every=None).step == 2
    with pytest.raises(ValueError, match="steps"):
        finetune(_wrapper(), dict_loader, steps=0)
    with pytest.raises(ValueError, match="schedule"):
        finetune(_wrapper(), dict_loader, steps=1, schedule="step")
    with pytest.raises(ValueError, match="no batches"):
        finetune(_wrapper(), [], steps=1)
    with pytest.raises(TypeError, match="batch"):
        finetune(_wrapper(), [torch.zeros(2, 3, 8, 8)], steps=1)


def test_calibration_fits_the_temperature_on_the_first_training_batches_and_keeps_the_rng():
    """``calibrate=True`` (the default) equals ``calibrate_temperature`` on the first batches of the
    loader's epoch-0 order after the same training, and leaves torch's RNG where training left it."""
    from errwrap import calibrate_temperature
    from errwrap.training._batches import Batches
    from errwrap.training.loop import CALIBRATION_BATCHES

    loader = _loader(n=40, batch_size=4)
    assert len(loader) < CALIBRATION_BATCHES  # every batch of the epoch, once
    calibrated = _wrapper()
    finetune(calibrated, loader, steps=6, lr=1e-2, log_every=None)
    after_calibrated = torch.get_rng_state()
    plain = _wrapper()
    finetune(plain, loader, steps=6, lr=1e-2, log_every=None, calibrate=False)
    assert torch.equal(torch.get_rng_state(), after_calibrated)
    assert plain.temperature == 1.0 and calibrated.temperature != 1.0
    batches = Batches(loader, seed=0)
    expected = calibrate_temperature(plain, [next(batches) for _ in range(len(loader))]).temperature
    assert calibrated.temperature == pytest.approx(expected, rel=1e-6)
    images = next(iter(loader))[0]
    with torch.no_grad():
        torch.testing.assert_close(calibrated.eval()(images).logits, plain.eval()(images).logits)


def test_calibration_without_labelled_pixels_warns_and_keeps_the_heads():
    dataset = [(image, torch.full_like(label, 255)) for image, label in Scenes(8, size=32)]
    unlabelled = torch.utils.data.DataLoader(dataset, batch_size=4)
    wrapper = _wrapper()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(wrapper, unlabelled, steps=1, log_every=None)
    messages = [str(w.message) for w in caught if "temperature" in str(w.message)]
    assert len(messages) == 1 and re.search("temperature was not calibrated .*no labelled pixels", messages[0])
    assert result.step == 1 and wrapper.temperature == 1.0
    with pytest.raises(ValueError, match="calibrate: expected True or False"):
        finetune(_wrapper(), _loader(), steps=1, calibrate="yes")


def test_validation_runs_in_eval_and_does_not_change_training():
    seen = []

    def val_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        torch.rand(100)  # consumes RNG: must not leak into training
        return {"metric": torch.tensor(0.5)}

    plain = finetune(_wrapper(), _loader(transform=RandomHorizontalFlip()), steps=4, log_every=None)
    validated = finetune(
        _wrapper(), _loader(transform=RandomHorizontalFlip()), steps=4, val_fn=val_fn, val_every=2, log_every=None
    )
    assert seen == [(False, False), (False, False)]
    assert validated.validation == [{"step": 2, "metric": 0.5}, {"step": 4, "metric": 0.5}]
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in validated.history]


def test_val_loader_uses_errwrap_evaluation(monkeypatch):
    calls = []

    class Report:
        def to_dict(self):
            return {"auroc": 0.75}

    def evaluate(model, loader):
        calls.append(loader)
        return Report()

    monkeypatch.setattr("errwrap.evaluation.evaluate", evaluate)
    val = _loader(n=4)
    result = finetune(_wrapper(), _loader(), steps=2, val_loader=val, log_every=None)
    assert calls == [val] and result.validation == [{"step": 2, "auroc": 0.75}]


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from errwrap import ErrorCorrectionWrapper
from errwrap.data import Scenes, make_loader
from errwrap.training import finetune
from tests.tiny import tiny_base

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
wrapper = ErrorCorrectionWrapper(tiny_base(0, num_classes=11), error_channels=8, detail_channels=8)
loader = make_loader(Scenes(16, size=32), batch_size=2, seed=0)
assert type(loader.sampler).__name__ == "DistributedSampler"
import errwrap.training.loop as loop
own_fits, fit = [], loop.calibrate_temperature
def recorded_fit(*args, **kwargs):  # this rank's own temperature; one rank may fail (no labels in its share)
    if rank == {failing_rank}:
        raise ValueError("no labelled pixels here")
    result = fit(*args, **kwargs)
    own_fits.append(result.temperature)
    return result
loop.calibrate_temperature = recorded_fit
result = finetune(wrapper, loader, steps=3, lr=1e-2, checkpoint_dir={ckpt!r}, log_every=None)
params = {{k: v.detach() for k, v in wrapper.named_parameters() if not k.startswith("base.")}}
torch.save({{"params": params, "history": result.history, "temperature": wrapper.temperature, "own": own_fits}},
           {out!r} + f"/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def _two_process_run(tmp_path: Path, failing_rank: int = -1) -> tuple[dict, dict, str]:
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "ddp.py"
    script.write_text(
        DDP_SCRIPT.format(root=root, ckpt=str(tmp_path / "ckpt"), out=str(tmp_path), failing_rank=failing_rank)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    return r0, r1, proc.stderr


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    r0, r1, _ = _two_process_run(tmp_path)
    assert r0["params"].keys() == r1["params"].keys() and r0["params"]
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]  # means over ranks
    assert r0["temperature"] == r1["temperature"] == pytest.approx((r0["own"][0] + r1["own"][0]) / 2)
    assert (tmp_path / "ckpt/latest").read_text().strip() == "step-000003"
    untrained = _wrapper()
    assert any(not torch.equal(p, r0["params"][k]) for k, p in untrained.named_parameters() if k in r0["params"])
    # One rank cannot fit (e.g. no labelled pixel in its share): it warns and both keep the other
    # rank's fit, instead of the others waiting for it forever.
    (tmp_path / "failing").mkdir()
    single, other, stderr = _two_process_run(tmp_path / "failing", failing_rank=1)
    assert other["own"] == [] and len(single["own"]) == 1
    assert single["temperature"] == other["temperature"] == pytest.approx(single["own"][0])
    assert "this process could not fit the temperature (no labelled pixels here)" in stderr


def test_images_of_different_sizes_are_explained_and_train_one_by_one():
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    items = [
        (torch.rand(3, h, w, generator=g), torch.randint(0, NUM_CLASSES, (h, w), generator=g))
        for h, w in ((32, 48), (40, 32), (32, 32))
    ]
    with pytest.raises(RuntimeError, match=r"train_loader: its items have different sizes.*batch_size=1"):
        finetune(_wrapper(), DataLoader(items, batch_size=2), steps=1, progress=False)
    result = finetune(_wrapper(), DataLoader(items, batch_size=1), steps=3, progress=False)
    assert result.step == 3 and all(math.isfinite(h["loss"]) for h in result.history)


def test_a_dataset_declaring_other_classes_is_refused_before_training():
    data = Scenes(4, size=32)
    data.num_classes = NUM_CLASSES + 1  # e.g. ADE20K's 150 classes against a 151-output model
    wrap = _wrapper()
    before = _heads(wrap)
    with pytest.raises(
        ValueError,
        match=rf"train_loader: its dataset has num_classes={NUM_CLASSES + 1}, but the model predicts {NUM_CLASSES}",
    ):
        finetune(wrap, make_loader(data, 2), steps=1, progress=False)
    with pytest.raises(ValueError, match="val_loader: its dataset"):
        finetune(wrap, _loader(n=4), val_loader=make_loader(data, 2, shuffle=False), steps=1, progress=False)
    assert all(torch.equal(v, _heads(wrap)[k]) for k, v in before.items())
