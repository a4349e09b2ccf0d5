"""Every ```python block in docs/*.md runs as written and prints what the docs say.

Each page's blocks run in order in one fresh namespace, in a subprocess whose working directory is
a temporary directory (files the snippets write land there). A block that cannot run here (real
data, a GPU, the Hub, the user's own network) is marked in the markdown on the line just before
its fence with ``<!-- not run: REASON -->``; it is still compiled, and the test lists it as skipped.

Output checks, inside the subprocess (so a check knows exactly which call produced what):

- ``print(...)  # TEXT``: the text that call printed contains ``TEXT``. A ``print(...)`` with no
  comment of its own, followed by comment-only lines, expects each of those lines.
- a bare expression with a shape comment, ``out.labels  # (2, 128, 128): ...``: the value's
  ``tuple(shape)`` equals it.

The parent counts the same comments with its own, simpler, line-based reading and requires the
subprocess to have checked exactly those lines, so a check cannot be skipped silently.

A ```text block marked ``<!-- output of the block above; numbers within TOL -->`` is what the
last runnable block before it printed: same lines and words, decimal numbers within ``TOL``
(training results move in the last digits with the thread count), integers exact, and the
numbers of lines that give times in ``ms`` not compared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOT_OURS = {"benchmarks.md", "gpu.md"}  # their blocks are benchmark commands with measured output
PAGES = sorted(p.name for p in DOCS.glob("*.md") if p.name not in NOT_OURS)

SKIP_MARK = re.compile(r"^<!-- not run: (?P<reason>.+?) -->\s*$")
OUTPUT_MARK = re.compile(r"^<!-- output of the block above; numbers within (?P<tol>[\d.]+) -->\s*$")
FENCE_OPEN = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
PRINT_WITH_COMMENT = re.compile(r"^\s*print\(.*\)\s+#\s*\S")
BARE_PRINT = re.compile(r"^\s*print\(.*\)\s*$")
COMMENT_LINE = re.compile(r"^\s*#\s*\S")
NUMBER = re.compile(r"(?P<num>[+-]?\d+(?:\.\d+)?)(?P<rest>%?,?)")
SHAPE_COMMENT = re.compile(r"^\s*[\w.\[\]-]+\s+#\s*\(\d+(?:,\s*\d+)*\)")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the first code line in the markdown file
    code: str
    skip: str | None


@dataclass
class ShownOutput:
    after: int  # the line of the python block whose output it is
    line: int
    text: str
    tol: float


def python_blocks(page: str) -> list[Block]:
    """The page's ```python blocks with their first line and their ``not run`` reason, if any."""
    lines = (DOCS / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE_OPEN.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if fence["lang"] == "python":
            mark = SKIP_MARK.match(lines[i - 1]) if i else None
            blocks.append(Block(page, i + 2, "\n".join(lines[i + 1:end]) + "\n", mark["reason"] if mark else None))
        i = end + 1
    return blocks


def shown_outputs(page: str) -> list[ShownOutput]:
    """The page's ```text blocks marked as the output of the runnable python block above them."""
    lines = (DOCS / page).read_text().splitlines()
    runnable = [b.line for b in python_blocks(page) if b.skip is None]
    shown = []
    for i, line in enumerate(lines):
        mark = OUTPUT_MARK.match(line)
        if mark:
            assert lines[i + 1] == "```text", f"docs/{page}:{i + 1}: an output mark must be followed by a ```text fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            before = [b for b in runnable if b < i + 1]
            assert before, f"docs/{page}:{i + 1}: no runnable python block above this output"
            shown.append(ShownOutput(before[-1], i + 3, "\n".join(lines[i + 2:end]), float(mark["tol"])))
    return shown


def output_differences(shown: str, got: str, tol: float) -> list[str]:
    """Where ``got`` differs from ``shown``: words exactly, integers exactly, decimals within ``tol``,
    no number compared on a line that reports times in ms."""
    want_lines, got_lines = shown.rstrip().splitlines(), got.rstrip().splitlines()
    if len(want_lines) != len(got_lines):
        return [f"{len(want_lines)} lines shown, {len(got_lines)} printed"]
    problems, time_column = [], None
    for k, (want, have) in enumerate(zip(want_lines, got_lines, strict=False)):
        a, b = want.split(), have.split()
        if len(a) != len(b):
            problems.append(f"line {k + 1}: {want!r} vs {have!r}")
            continue
        if not a:
            time_column = None  # a table ends at a blank line
        elif "ms/img" in a:
            time_column = a.index("ms/img") - len(a)  # counted from the right: rows have a name column
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            nx, ny = NUMBER.fullmatch(x), NUMBER.fullmatch(y)
            if nx and ny and nx["rest"] == ny["rest"]:
                if " ms" in want or (time_column is not None and i - len(a) == time_column):
                    continue
                if "." in nx["num"] and "." in ny["num"]:
                    if abs(float(nx["num"]) - float(ny["num"])) <= tol:
                        continue
                elif nx["num"] == ny["num"]:
                    continue
            elif x == y:
                continue
            problems.append(f"line {k + 1}: {x!r} shown, {y!r} printed in {have!r}")
    return problems


def expected_check_lines(block: Block) -> set[int]:
    """Markdown line numbers of the output comments, read line by line (independent of the runner)."""
    lines = block.code.splitlines()
    found = set()
    for k, line in enumerate(lines):
        commented_print = BARE_PRINT.match(line) and k + 1 < len(lines) and COMMENT_LINE.match(lines[k + 1])
        if PRINT_WITH_COMMENT.match(line) or SHAPE_COMMENT.match(line) or commented_print:
            found.add(block.line + k)
    return found


# Runs in the subprocess: reads the blocks (JSON on stdin), rewrites the checked calls, runs each
# block in one namespace, writes a JSON result to the file named by argv[1].
RUNNER = r'''
import ast, io, json, re, sys, tokenize, traceback

blocks = json.load(sys.stdin)
result = {"ran": [], "checks": [], "error": None}
SHAPE = re.compile(r"^#\s*\((\d+(?:,\s*\d+)*)\)")


def _print(expected, where, *args, **kwargs):
    buf = io.StringIO()
    print(*args, **{**kwargs, "file": buf})
    text = buf.getvalue()
    sys.stdout.write(text)
    missing = [e for e in expected if e not in text]
    result["checks"].append(
        {"where": where, "kind": "print", "ok": not missing, "expected": expected, "got": text[-2000:]}
    )


def _shape(expected, where, value):
    got = tuple(getattr(value, "shape", ()))
    result["checks"].append(
        {"where": where, "kind": "shape", "ok": got == tuple(expected), "expected": list(expected), "got": str(got)}
    )
    return value


def comments(code):
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.string, tok.line.strip().startswith("#"))
    return out


def rewrite(code, first_line, page):
    tree = ast.parse(code)
    notes = comments(code)
    body = []
    for node in tree.body:
        comment, own_line = notes.get(node.end_lineno, (None, False))
        trailing = comment if comment is not None and not own_line else None
        where = f"{page}:{first_line + node.lineno - 1}"
        is_call = isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
        if is_call and getattr(node.value.func, "id", None) == "print":
            expected = [trailing[1:].strip()] if trailing else []
            k = node.end_lineno + 1
            while not trailing and k in notes and notes[k][1]:
                expected.append(notes[k][0][1:].strip())
                k += 1
            if expected:
                call = node.value
                call.func = ast.Name("_doc_print", ast.Load())
                call.args = [ast.Constant(tuple(expected)), ast.Constant(where), *call.args]
        elif isinstance(node, ast.Expr) and trailing and SHAPE.match(trailing):
            shape = tuple(int(s) for s in SHAPE.match(trailing)[1].split(","))
            node.value = ast.Call(
                ast.Name("_doc_shape", ast.Load()), [ast.Constant(shape), ast.Constant(where), node.value], []
            )
        body.append(node)
    tree.body = body
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, first_line - 1)
    return tree


namespace = {"__name__": "__main__", "_doc_print": _print, "_doc_shape": _shape}
try:
    for block in blocks:
        where = f"{block['page']}:{block['line']}"
        print(f"----- {where}", flush=True)
        code = compile(rewrite(block["code"], block["line"], block["page"]), f"docs/{block['page']}", "exec")
        exec(code, namespace)
        result["ran"].append(where)
except BaseException:
    result["error"] = traceback.format_exc()[-6000:]
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
'''


NOT_RUN = [b for p in PAGES for b in python_blocks(p) if b.skip is not None]


@pytest.mark.parametrize("block", NOT_RUN, ids=[f"{b.page}:{b.line}" for b in NOT_RUN])
def test_block_marked_not_run_is_valid_python(block):
    """Listed as skipped with its reason (``pytest -rs``), after checking that it compiles."""
    compile(block.code, f"docs/{block.page}:{block.line}", "exec")
    pytest.skip(f"docs/{block.page}:{block.line} not run: {block.skip}")


@pytest.mark.slow  # each page starts a Python with torch and runs its examples: 5-20 s
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.skip is None for b in python_blocks(p))])
def test_page_snippets_run_and_print_what_the_docs_say(page, tmp_path):
    blocks = python_blocks(page)
    runnable = [b for b in blocks if b.skip is None]
    if any(b.page == "models.md" for b in runnable):
        pytest.importorskip("segmentation_models_pytorch")
        pytest.importorskip("transformers")

    out_file = tmp_path / "result.json"
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out_file)],
        input=json.dumps([b.__dict__ for b in runnable]),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out_file.is_file(), f"runner crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(out_file.read_text())
    assert result["error"] is None, (
        f"a block of docs/{page} failed:\n{result['error']}\n--- stdout:\n{proc.stdout[-3000:]}"
    )
    assert result["ran"] == [f"{page}:{b.line}" for b in runnable]

    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed, "output differs from the docs:\n" + "\n".join(
        f"{c['where']}: expected {c['expected']!r}, got {c['got']!r}" for c in failed)
    wanted = set().union(*(expected_check_lines(b) for b in runnable))
    checked = {int(c["where"].rsplit(":", 1)[1]) for c in result["checks"]}
    assert checked == wanted, f"output comments on lines {sorted(wanted)} of docs/{page}, checked {sorted(checked)}"
    printed = dict(re.findall(r"^----- \S+:(\d+)\n(.*?)(?=^----- |\Z)", proc.stdout, flags=re.S | re.M))
    for shown in shown_outputs(page):
        problems = output_differences(shown.text, printed[str(shown.after)], shown.tol)
        assert not problems, f"docs/{page}:{shown.line}: the shown output is not what the block prints:\n" + "\n".join(
            problems
        )


def test_output_checks_are_not_vacuous():
    """The pages that show printed output have checks to run, and every skip mark sits on a fence."""
    counts = {p: sum(len(expected_check_lines(b)) for b in python_blocks(p) if b.skip is None) for p in PAGES}
    assert counts["models.md"] >= 6 and counts["quickstart.md"] >= 4, counts
    for page in PAGES:
        lines = (DOCS / page).read_text().splitlines()
        for k, line in enumerate(lines):
            if "not run" in line and line.lstrip().startswith("<!--"):
                assert SKIP_MARK.match(line) and k + 1 < len(lines) and lines[k + 1].startswith("```python"), (
                    f"docs/{page}:{k + 1}: a 'not run' mark must be '<!-- not run: REASON -->' on the line before a "
                    "```python fence"
                )


def test_runner_catches_wrong_output(tmp_path):
    """The checker itself fails on a wrong printed value and a wrong shape."""
    code = "import torch\nx = torch.zeros(2, 3)\nprint(x.shape)  # torch.Size([2, 4])\nx  # (2, 4)\nprint(1 + 1)\n# 2\n"
    out_file = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, "-c", RUNNER, str(out_file)],
        input=json.dumps([{"page": "t.md", "line": 10, "code": code}]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out_file.read_text())
    assert result["error"] is None
    assert [(c["where"], c["kind"], c["ok"]) for c in result["checks"]] == [
        ("t.md:12", "print", False), ("t.md:13", "shape", False), ("t.md:14", "print", True)]
    block = Block("t.md", 10, code, None)
    assert expected_check_lines(block) == {12, 13, 14}


def test_output_comparison_tolerates_digits_and_timings_only():
    shown = "evaluated 64 images: mIoU 70.02, 12.05% wrong\ntime per image: base 0.71 ms"
    assert (
        output_differences(shown, "evaluated 64 images: mIoU 70.40, 12.50% wrong\ntime per image: base 9.9 ms", 0.5)
        == []
    )
    table = "score  AUROC  ms/img\nhead   89.35   1.69\n\nafter  1.00"
    assert output_differences(table, "score  AUROC  ms/img\nhead   89.40   7.50\n\nafter  1.00", 0.5) == []
    assert output_differences(table, "score  AUROC  ms/img\nhead   91.40   1.69\n\nafter  1.00", 0.5)
    assert output_differences(table, "score  AUROC  ms/img\nhead   89.35   1.69\n\nafter  3.00", 0.5)
    assert output_differences(shown, "evaluated 64 images: mIoU 71.02, 12.05% wrong\ntime per image: base 0.71 ms", 0.5)
    assert output_differences(shown, "evaluated 65 images: mIoU 70.02, 12.05% wrong\ntime per image: base 0.71 ms", 0.5)
    assert output_differences(
        shown, "evaluated 64 pictures: mIoU 70.02, 12.05% wrong\ntime per image: base 0.71 ms", 0.5
    )
    assert output_differences(shown, "evaluated 64 images: mIoU 70.02, 12.05% wrong", 0.5)
    assert [s.after for s in shown_outputs("metrics.md")] == [
        b.line for b in python_blocks("metrics.md") if b.skip is None
    ]


def test_api_page_names_exist():
    """Every name in docs/api.md's table is public in the module of its row (methods of a class in parentheses)."""
    import importlib

    rows = re.findall(r"^\| (`errwrap\.[^|]+) \| ([^|]+) \|", (DOCS / "api.md").read_text(), flags=re.M)
    assert len(rows) >= 15
    for modules, names in rows:
        public = set()
        for name in re.findall(r"`(errwrap\.[\w.]+)`", modules):
            public |= set(importlib.import_module(name).__all__)
        listed = re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", names))
        assert listed and set(listed) <= public, f"{modules}: not public: {sorted(set(listed) - public)}"


def test_relative_links_in_docs_resolve():
    for page in PAGES:
        text = (DOCS / page).read_text()
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (DOCS / link).exists(), f"docs/{page} links to missing {link}"
