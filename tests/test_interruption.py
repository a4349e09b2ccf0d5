"""A fine-tuning process killed with SIGKILL resumes from its last checkpoint to the same result."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("_finetune_job.py")


def _run(*args, timeout=240):
    result = subprocess.run(
        [sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    steps = 8
    _run(tmp_path / "ckpt-ref", tmp_path / "ref.pt", steps)

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(JOB), str(ckpt), str(tmp_path / "killed.pt"), str(steps), "slow"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpt / "step-000004").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    assert (ckpt / "step-000004").is_dir(), "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.pt").exists()
    assert (ckpt / "latest").read_text().strip().startswith("step-")

    _run(ckpt, tmp_path / "resumed.pt", steps, "resume")
    ref, resumed = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "resumed.pt")
    assert resumed["losses"] == pytest.approx(ref["losses"][-len(resumed["losses"]):], rel=1e-5, abs=1e-6)
    for k, v in ref["state"].items():
        assert torch.allclose(v.float(), resumed["state"][k].float(), atol=1e-5), k


def _saved_version(target: Path) -> int:
    """The version of a saved model directory, after checking that its three files agree."""
    import json

    from safetensors.torch import load_file

    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((target / "config.json").read_text())
    version = round((config["heads"].get("temperature", 1.0) - 1.0) * 1000)
    bias = load_file(str(target / "model.safetensors"))["error_head.classifier.bias"]
    assert bias.item() == version, f"config of save {version}, weights of save {bias.item()}"
    assert config["class_names"][0] == f"v{version}c0"
    assert f"v{version}c0" in (target / "README.md").read_text(), f"README of another save than {version}"
    return version


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"), reason="needs fork and SIGKILL")
def test_sigkill_during_save_pretrained_leaves_the_old_or_the_new_model(tmp_path):
    import random

    from errwrap import ErrorCorrectionWrapper

    from .tiny import tiny_base

    wrap = ErrorCorrectionWrapper(tiny_base(), error_channels=8, detail_channels=8).eval()
    target = tmp_path / "model"

    def set_version(v: int) -> None:
        with torch.no_grad():
            wrap.error_head.classifier.bias.fill_(float(v))
        wrap.temperature = 1.0 + v / 1000
        wrap.class_names = [f"v{v}c{i}" for i in range(5)]

    set_version(0)
    wrap.save_pretrained(target)
    rng, seen = random.Random(0), set()
    for kill in range(30):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves new versions until it is killed, and says when each is saved
            try:
                os.close(read_end)
                torch.set_num_threads(1)
                v = 1 + 1000 * kill
                while True:
                    set_version(v)
                    wrap.save_pretrained(target)
                    os.write(write_end, b".")
                    v += 1
            finally:
                os._exit(1)
        os.close(write_end)
        try:
            # one save done: kill during a later one
            assert os.read(read_end, 1) == b".", "the saving child died before its first save"
            time.sleep(rng.uniform(0.0, 0.04))
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(read_end)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the saving child died on its own"
        seen.add(_saved_version(target))
    assert len(seen) == 30, "every kill came after at least one save of its own"
    set_version(7)
    wrap.save_pretrained(target)  # removes what the killed processes left
    assert _saved_version(target) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
