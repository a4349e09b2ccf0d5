"""write_report and ``errwrap report``: a static page, worst images first, every string escaped,
and (when Chromium is installed) a real headless browser that loads it without errors."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import errwrap
from errwrap import ErrorCorrectionWrapper, write_report
from errwrap.cli import main, parse_data_spec
from errwrap.data import Scenes
from errwrap.models import DeepLabV3Plus

# the tiny wrappers' heads are untrained on purpose: the page's structure is under test, not its numbers
pytestmark = pytest.mark.filterwarnings("ignore:the error, detail and fusion heads are freshly initialised:UserWarning")

HOSTILE = '<img src=x onerror=alert(1)>"&\'b'
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def tiny_wrapper() -> ErrorCorrectionWrapper:
    torch.manual_seed(0)
    base = DeepLabV3Plus("resnet18", num_classes=11, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    return ErrorCorrectionWrapper(base, error_channels=8, detail_channels=8).eval()


class Page(HTMLParser):
    """The parts of a report page the tests read."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.hrefs: list[str] = []
        self.sections: list[str] = []
        self.names: list[str] = []
        self.starttag_attrs: list[tuple[str, str | None]] = []
        self._in_name = False
        self.open: list[str] = []
        self.feed(text)
        self.close()
        assert not self.open, f"unclosed tags: {self.open}"

    VOID = {"img", "meta", "br", "hr", "input", "link", "source", "wbr"}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)
        self.starttag_attrs.extend(attrs)
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "a":
            self.hrefs.append(attrs["href"])
        if tag == "section" and attrs.get("class") == "image":
            self.sections.append(attrs["id"])
        if tag == "span" and attrs.get("class") == "image-name":
            self._in_name = True
            self.names.append("")

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        if tag == "span":
            self._in_name = False

    def handle_data(self, data):
        if self._in_name:
            self.names[-1] += data


@pytest.fixture(scope="module")
def wrapper():
    return tiny_wrapper()


@pytest.fixture(scope="module")
def labelled_page(wrapper, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    dataset = Scenes(5, size=32, split="val")
    return write_report(wrapper, dataset, out, worst=3)


def _sources_resolve(page: Path, parsed: Page) -> None:
    for img in parsed.imgs:
        src = img["src"]
        assert src, img
        if src.startswith("data:"):
            continue
        assert not src.startswith(("/", "file:", "http:", "https:")), src
        assert (page.parent / src).is_file(), f"{src} does not resolve next to {page}"
    for href in parsed.hrefs:
        assert (page.parent / href).is_file(), f"link {href} does not resolve next to {page}"


def test_page_shows_the_worst_images_first_with_truth_and_risk_coverage(wrapper, labelled_page):
    page = labelled_page
    assert page.name == "index.html" and page.is_file()
    text = page.read_text(encoding="utf-8")
    parsed = Page(text)
    assert parsed.tags[:2] == ["html", "head"] and "body" in parsed.tags
    assert parsed.sections == ["rank-1", "rank-2", "rank-3"]  # min(worst=3, 5 images)
    data = json.loads((page.parent / "report.json").read_text())
    assert data["labelled"] is True and len(data["ranking"]) == 3
    rows = {r["index"]: r for r in data["comparison"]["per_image"]}
    shown = [rows[i]["pixel_accuracy"] for i in data["ranking"]]
    assert shown == sorted(shown)  # predicted accuracy ascending: most likely wrong first
    assert max(shown) <= min(r["pixel_accuracy"] for i, r in rows.items() if i not in data["ranking"])
    independent = errwrap.compare_estimates(wrapper, DataLoader(Scenes(5, size=32, split="val"), batch_size=1))
    assert data["ranking"] == [r["index"] for r in independent.estimate.worst(3)]
    assert data["estimate"]["pixel_accuracy"] == pytest.approx(independent.estimate.pixel_accuracy, abs=1e-9)
    # every image, its labels, ground truth, error map and colour bar; the risk-coverage plot
    srcs = [img["src"] for img in parsed.imgs]
    assert "images/risk_coverage.png" in srcs and "images/accuracy.png" in srcs
    scatter = np.asarray(Image.open(page.parent / "images/accuracy.png"))
    # shown images red, others blue
    assert ((scatter == (214, 39, 40)).all(-1).any() and (scatter == (31, 119, 180)).all(-1).any())
    assert sum(s.endswith("_truth.png") for s in srcs) == 3 and sum(s == "images/colorbar.png" for s in srcs) == 3
    assert len(parsed.imgs) == 3 * 5 + 2
    _sources_resolve(page, parsed)
    assert "true pixel accuracy" in text and f"{100 * independent.truth['fused']['pixel_accuracy']:.2f}%" in text
    assert Image.open(page.parent / "images/001_image.png").size == (32, 32)
    # nothing fetched from elsewhere, no script
    assert "http://" not in text and "https://" not in text and "//" not in text.replace("<!DOCTYPE html>", "")
    assert not {"script", "link", "iframe", "object"} & set(parsed.tags) and "url(" not in text


def test_without_labels_and_more_worst_than_images(wrapper, tmp_path):
    loader = DataLoader(Scenes(4, size=32, split="val"), batch_size=3)
    page = write_report(wrapper, loader, tmp_path, labels=False, worst=10)
    parsed = Page(page.read_text(encoding="utf-8"))
    assert len(parsed.sections) == 4  # min(worst=10, 4 images)
    srcs = [img["src"] for img in parsed.imgs]
    assert not any(s.endswith(("_truth.png", "risk_coverage.png", "accuracy.png")) for s in srcs) and len(srcs) == 4 * 4
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["labelled"] is False and "comparison" not in data
    report = errwrap.estimate(wrapper, loader)
    assert data["ranking"] == [r["index"] for r in report.worst(4)]
    assert parsed.names == [f"image {i}" for i in data["ranking"]]
    _sources_resolve(page, parsed)
    # a second report in the same folder replaces the pictures of the first
    write_report(wrapper, loader, tmp_path, labels=False, worst=1)
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == [
        "001_error.png",
        "001_image.png",
        "001_labels.png",
        "colorbar.png",
    ]


def test_hostile_names_are_escaped(wrapper, tmp_path):
    dataset = Scenes(2, size=32, split="val")
    names = [HOSTILE, "a<b>.png"]
    page = write_report(
        wrapper, dataset, tmp_path, names=names, class_names=[f"<i>{i}</i>" for i in range(11)], title="<b>t</b>"
    )
    text = page.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "<i>" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;&quot;&amp;&#x27;b" in text
    parsed = Page(text)
    assert len(parsed.imgs) == 2 * 5 + 2  # no image smuggled in by a name
    assert sorted(parsed.names) == sorted(names)
    assert not any(name == "onerror" for name, _ in parsed.starttag_attrs)


def test_a_loader_that_changes_between_passes_is_refused(wrapper, tmp_path):
    class Drifting:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            yield Scenes(2, size=32, split="val")[0][0][None] / self.passes  # darker on each pass

    with pytest.raises(ValueError, match="same images in the same order"):
        write_report(wrapper, Drifting(), tmp_path, worst=2)

    class Shrinking:  # one image fewer on each pass
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            yield from (Scenes(4, size=32, split="val")[i][0][None] for i in range(max(1, 5 - self.passes)))

    with pytest.raises(ValueError, match=r"images \[\d\] were not there on a second pass"):
        write_report(wrapper, Shrinking(), tmp_path, worst=4)


def test_bad_arguments_are_named(wrapper, tmp_path):
    dataset = Scenes(2, size=32, split="val")
    with pytest.raises(ValueError, match="worst: expected a non-negative int"):
        write_report(wrapper, dataset, tmp_path, worst=-1)
    with pytest.raises(TypeError, match="read more than once"):
        write_report(wrapper, iter([torch.rand(1, 3, 32, 32)]), tmp_path)
    with pytest.raises(ValueError, match=r"names: expected one name per image \(2\), got 1"):
        write_report(wrapper, dataset, tmp_path, names=["only one"], labels=False)
    with pytest.raises(ValueError, match="class_names: expected 11 names"):
        write_report(wrapper, dataset, tmp_path, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"palette: expected at least 11 RGB colours"):
        write_report(wrapper, dataset, tmp_path, palette=np.zeros((3, 3), dtype=np.uint8))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="expected a directory"):
        write_report(wrapper, dataset, a_file)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    wrap = tiny_wrapper()
    wrap.preprocessing = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    path = tmp_path_factory.mktemp("model")
    wrap.save_pretrained(path, class_names=[f"c{i}" for i in range(11)])
    return path


def test_cli_and_python_write_the_same_ranking(model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "report",
        "--model",
        str(model_dir),
        "--data",
        "scenes:6",
        "--size",
        "32",
        "--max-images",
        "5",
        "--worst",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert f"wrote {out / 'index.html'} (3 of 5 images, worst first)" in capsys.readouterr().out
    wrap = ErrorCorrectionWrapper.from_pretrained(model_dir)
    from errwrap.cli import _normalizer

    normalize, _, _ = _normalizer(wrap)
    dataset = torch.utils.data.Subset(parse_data_spec("scenes:6", "val", transform=normalize, size=32), range(5))
    page = write_report(wrap, dataset, tmp_path / "python", worst=3)
    cli, python = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "python"))
    assert cli["ranking"] == python["ranking"] and len(cli["ranking"]) == 3
    assert cli["estimate"]["num_images"] == 5
    assert Page((out / "index.html").read_text()).names == Page(page.read_text()).names
    assert "c0" in (out / "index.html").read_text()  # the model's class names in the legend
    # the images are shown de-normalised with the model's preprocessing: the CLI's and Python's pictures agree
    assert np.array_equal(
        np.asarray(Image.open(out / "images/001_image.png")),
        np.asarray(Image.open(tmp_path / "python/images/001_image.png")),
    )


def test_cli_on_image_files_escapes_hostile_file_names(model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in (HOSTILE + ".png", "plain.png"):
        Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(folder / name)
    out = tmp_path / "page"
    assert (
        main(
            ["report", "--model", str(model_dir), "--data", f"images:{folder}", "--out", str(out), "--corrupt", "fog:2"]
        )
        == 0
    )
    text = (out / "index.html").read_text(encoding="utf-8")
    parsed = Page(text)
    assert sorted(parsed.names) == sorted([HOSTILE + ".png", "plain.png"]) and "<img src=x" not in text
    assert len(parsed.imgs) == 2 * 4 and "No labels" in text
    assert Image.open(out / "images/001_image.png").size == (40, 24)
    assert (
        main(
            [
                "report",
                "--model",
                str(model_dir),
                "--data",
                "scenes:2",
                "--size",
                "32",
                "--out",
                str(out / "index.html"),
            ]
        )
        == 2
    )
    assert "expected a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || "error"));
}, true);
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) loaded++; }
  var out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({errors: window.__errors, images: images.length, loaded: loaded});
  document.body.appendChild(out);
});
</script>"""


def _load_in_browser(binary: str, page: Path, profile: Path, extra: str = "") -> tuple[dict, str]:
    """Open a copy of ``page`` (with a script that records errors and counts decoded images)
    headless; return what the script recorded and Chromium's log."""
    probe = page.with_name("browser_check.html")
    probe.write_text(
        page.read_text(encoding="utf-8")
        .replace("<head>", "<head>" + CHECK_SCRIPT, 1)
        .replace("</body>", extra + "</body>"),
        encoding="utf-8",
    )
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = Page(run.stdout)
    marker = run.stdout.split('<pre id="browser-check">', 1)
    assert len(marker) == 2, f"the check script did not run; DOM: {run.stdout[:500]}"
    # the DOM shows the page's images
    assert [img["src"] for img in dom.imgs] == [img["src"] for img in Page(page.read_text(encoding="utf-8")).imgs]
    return json.loads(html.unescape(marker[1].split("</pre>", 1)[0])), run.stderr


@pytest.mark.skipif(
    _chromium() is None,
    reason=f"no Chromium binary on PATH ({', '.join(CHROMIUM_NAMES)}); .ci/run installs it when it can",
)
def test_a_headless_browser_loads_the_page_without_errors_and_shows_every_image(labelled_page, tmp_path):
    binary = _chromium()
    result, log = _load_in_browser(binary, labelled_page, tmp_path / "profile")
    assert result == {"errors": [], "images": 17, "loaded": 17}
    assert "CONSOLE" not in log, [line for line in log.splitlines() if "CONSOLE" in line]
    # the check can fail: a missing picture and a script error are seen
    broken = tmp_path / "broken"
    shutil.copytree(labelled_page.parent, broken)
    (broken / "images" / "002_error.png").unlink()
    result, log = _load_in_browser(
        binary, broken / "index.html", tmp_path / "profile2", extra="<script>undefinedFunction();</script>"
    )
    assert result["images"] == 17 and result["loaded"] == 16
    assert any("002_error.png" in e for e in result["errors"]) and any(
        "undefinedFunction" in e for e in result["errors"]
    )
    assert "undefinedFunction" in log


def test_report_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(
        option in text
        for option in ("--model", "--data", "--out", "--corrupt", "--max-images", "--worst", "--no-labels")
    )
    assert main(["report", "--model", "m", "--data", "scenes:2", "--out", "o", "--corrupt", "rain:2"]) == 2
    assert "--corrupt 'rain:2': expected KIND or KIND:SEVERITY" in capsys.readouterr().err
