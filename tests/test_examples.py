"""The quick examples run as written (the Cityscapes recipe needs data and only shows --help)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.optional
@pytest.mark.parametrize(
    "script, module",
    [
        ("wrap_smp.py", "segmentation_models_pytorch"),
        ("wrap_torchvision.py", "torchvision"),
        ("wrap_segformer.py", "transformers"),
        ("wrap_mask2former.py", "transformers"),
    ],
)
def test_wrap_examples_run(script, module):
    pytest.importorskip(module)
    result = _run(EXAMPLES / script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error_prob (" in result.stdout and "adapter '" in result.stdout


def test_cityscapes_recipe_has_help_and_refuses_missing_data(tmp_path):
    result = _run(EXAMPLES / "finetune_cityscapes.py", "--help")
    assert result.returncode == 0 and "usage" in result.stdout.lower()
    missing = _run(
        EXAMPLES / "finetune_cityscapes.py",
        "--data",
        tmp_path / "nothing",
        "--base-weights",
        tmp_path / "w.pt",
        "--out",
        tmp_path / "o",
    )
    assert missing.returncode != 0


@pytest.mark.slow
def test_finetune_scenes_example_runs_small():
    result = _run(EXAMPLES / "finetune_scenes.py", "--size", "32", "--train-images", "32", "--val-images", "8",
                  "--batch-size", "8", "--base-steps", "4", "--head-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error_head" in result.stdout
