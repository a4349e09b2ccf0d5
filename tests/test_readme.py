"""The README's quick start runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path):
    blocks = _python_blocks((ROOT / "README.md").read_text())
    quick_start = next(b for b in blocks if "ErrorCorrectionWrapper(base)" in b)
    result = subprocess.run(
        [sys.executable, "-c", quick_start],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([2, 128, 128]) torch.Size([2, 128, 128])" in result.stdout
    assert "error_head" in result.stdout  # the report table
    assert (tmp_path / "my-errwrap-model" / "model.safetensors").is_file()


def test_readme_names_the_two_commands_and_links_exist():
    text = (ROOT / "README.md").read_text()
    assert "errwrap demo" in text and "python -m pytest" in text
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), f"README links to missing {path}"
        if anchor:  # GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.M)
            ids = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
            assert anchor in ids, f"README links to {link}, but {path} has no such heading"
