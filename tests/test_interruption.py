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
    result = subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, timeout=timeout)
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
