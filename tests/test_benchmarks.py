"""Smoke tests of the benchmark scripts: each runs at ``--tiny`` size in a subprocess and its JSON
output and ``SUMMARY`` line are checked, so the scripts cannot silently rot.

Each script imports torch and trains or times real (tiny) models, which takes longer than a few
seconds on 2 cores, so every test here is marked slow.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.slow


def _run(script: str, tmp: Path, *extra: str) -> tuple[dict, dict, str]:
    out_json = tmp / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--tiny", "--json", str(out_json), *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("SUMMARY "), proc.stdout[-2000:]
    summary = json.loads(last[len("SUMMARY "):])
    data = json.loads(out_json.read_text())
    assert data["summary"] == summary
    assert data["versions"]["torch"] and data["date"] and data["machine"]["cpu_count"] >= 1
    return summary, data, proc.stdout


def _is_rate(v: float) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def test_help_lists_the_options():
    for script, option in (
        ("overhead", "--channels-last"),
        ("mc_dropout", "--model"),
        ("training_cost", "--encoder"),
        ("quality", "--families"),
        ("estimate", "--shifts"),
        ("inference_path", "--no-compile"),
    ):
        proc = subprocess.run(
            [sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0 and option in proc.stdout and "--json" in proc.stdout and "--tiny" in proc.stdout


def test_overhead(tmp):
    summary, data, stdout = _run("overhead", tmp, "--plot", str(tmp / "overhead.png"), "--fuse-at-features")
    assert summary["benchmark"] == "overhead" and summary["size"] == [[64, 128]]
    ((key, model),) = summary["models"].items()
    assert key == "tiny_deeplabv3plus_resnet18/64x128/b1" and model["target_all"] == 1.3
    assert model["width"] == 64 and 0 < model["error_ratio"] < 20 and 0 < model["all_ratio"] < 20
    assert model["all_met"] == (model["all_ratio"] <= 1.3) and model["memory_met"] is None
    assert 1.0 <= model["memory_ratio"] < 20
    assert 0 < model["added_params_pct_of_reference"] < 5  # a few hundred thousand parameters on 40 M
    rows = {r["variant"]: r for r in data["results"][0]["rows"]}
    assert set(rows) == {"base", "error@64", "all@64", "error@16", "all@16", "features@64"}
    # the same heads fused at the features' resolution: the same parameters, the same convolutions
    assert rows["features@64"]["added_params"] == rows["all@64"]["added_params"]
    assert rows["features@64"]["gflops"] == rows["all@64"]["gflops"]
    # parameters and FLOPs are exact counts: the heads only add, and a wider head adds more
    assert rows["base"]["added_params"] == 0 and rows["base"]["ratio"]["median"] == 1.0
    assert 0 < rows["error@16"]["added_params"] < rows["error@64"]["added_params"] < rows["all@64"]["added_params"]
    assert rows["base"]["gflops"] < rows["error@64"]["gflops"] < rows["all@64"]["gflops"]
    assert rows["all@16"]["gflops"] < rows["all@64"]["gflops"]
    assert 0 < rows["base"]["peak_memory_mb"] <= rows["all@64"]["peak_memory_mb"]
    assert all(len(t) == 3 and min(t) > 0 for t in data["results"][0]["times_s"].values())
    assert (tmp / "overhead.png").stat().st_size > 1000 and "targets" in stdout


def test_inference_path(tmp):
    summary, data, stdout = _run("inference_path", tmp)
    assert summary["benchmark"] == "inference_path" and summary["size"] == [64, 128]
    assert set(summary["x_base"]) == {"base", "base channels_last", "no_grad", "inference_mode", "channels_last"}
    assert summary["x_base"]["base"] == 1.0 and all(0 < v < 20 for v in summary["x_base"].values())
    assert summary["fastest"] in {"no_grad", "inference_mode", "channels_last"}
    # every path gives the eager answer: the inference path changes speed, not results
    assert summary["outputs_agree"] is True
    assert all(r["labels_equal"] >= 0.999 for k, r in data["results"].items() if not k.startswith("base"))
    assert "fastest wrapper path" in stdout


def test_training_cost(tmp):
    summary, data, _ = _run("training_cost", tmp)
    assert summary["benchmark"] == "training_cost" and summary["encoder"] == "resnet18"
    assert set(summary["seconds_per_step"]) == {"base", "heads", "joint"}
    assert all(v > 0 for v in summary["seconds_per_step"].values())
    assert 0 < summary["heads_ratio"] < 20 and 0 < summary["joint_ratio"] < 20
    assert summary["heads_target_met"] == (summary["heads_ratio"] <= 0.6)
    assert summary["joint_target_met"] == (summary["joint_ratio"] <= 1.25)


def test_quality_over_families_bases_and_shifts(tmp):
    summary, data, stdout = _run("quality", tmp, "--head-focus", "4")  # the loss's default, passed explicitly
    assert summary["benchmark"] == "quality" and set(summary["worst"]) == {"aupr", "aurc", "miou"}
    assert data["config"]["head_focus"] == 4.0
    for key, worst in summary["worst"].items():
        assert math.isfinite(worst["margin"]) and 0 <= worst["cells_met"] <= worst["cells"] == 2
        assert summary["targets_met"][key] == (worst["margin"] >= 0)
    (run,) = data["runs"]
    assert set(run["conditions"]) == {"clean", data["config"]["shifts"][0]}
    for r in run["conditions"].values():
        assert set(r["detection"]) == {
            "errwrap",
            "error_head",
            "msp",
            "entropy",
            "max_logit",
            "energy",
            "temperature_msp",
            "mc_dropout",
            "ensemble",
        }
        assert all(_is_rate(m["aupr_error"]) and _is_rate(m["auroc"]) for m in r["detection"].values()), r["detection"]
        assert all(_is_rate(v) for v in r["miou"].values()) and all(_is_rate(v) for v in r["error_rate"].values())
        assert all(0.0 <= v <= 1.0 for v in r["aurc"].values())
    # the published worst margin is the minimum over the cells' margins
    margins = data["cells"]["margins"]
    assert math.isclose(summary["worst"]["aurc"]["margin"], min(m["aurc"] for m in margins.values()))
    assert "| target" in stdout


def test_mc_dropout(tmp):
    summary, data, _ = _run("mc_dropout", tmp)
    assert summary["benchmark"] == "mc_dropout" and summary["T"] == [2, 3]
    assert set(summary["aupr_error"]) == {"error_head", "msp", "entropy", "mc_dropout T=2", "mc_dropout T=3"}
    assert all(_is_rate(v) for v in summary["aupr_error"].values())
    assert all(0 < s < 1000 for s in summary["speedup_vs_mc_T10"].values())
    assert data["model"]["image_size"] == 32 and data["model"]["val_images"] == 8


def test_estimate(tmp):
    summary, data, stdout = _run("estimate", tmp, "--shifts", "blur", "noise", "--bases", "deeplabv3plus", "stride8")
    assert summary["benchmark"] == "estimate" and summary["families"] == ["scenes"]
    assert summary["bases"] == ["deeplabv3plus", "stride8"]
    assert summary["conditions"] == ["none", "blur", "noise"]
    groups = ("scenes/deeplabv3plus", "scenes/stride8")
    assert [f"{r['family']}/{r['base']}" for r in data["runs"]] == list(groups)
    for group in groups:
        for table in ("abs_error_pixel_accuracy", "abs_error_miou"):
            for condition in summary["conditions"]:
                values = summary[table][group][condition]
                assert set(values) == {"errwrap", "errwrap+T", "avg_confidence", "atc"} and all(
                    _is_rate(v) for v in values.values()
                )
        assert all(-1.0 <= v <= 1.0 for c in summary["spearman"][group].values() for v in c.values())
    run = data["runs"][0]
    assert 0.0 < run["atc_threshold"] < 1.0 and run["temperature"] > 0
    for condition in run["conditions"].values():
        errors, truth = condition["errors"], condition["truth"]
        assert errors["errwrap"]["pixel_accuracy"] == abs(
            errors["errwrap"]["estimate_pixel_accuracy"] - truth["fused"]["pixel_accuracy"]
        )
        assert errors["atc"]["pixel_accuracy"] == abs(
            errors["atc"]["estimate_pixel_accuracy"] - truth["base"]["pixel_accuracy"]
        )
        assert len(condition["per_image"]) == 8
    # a shift changes the images the model sees, so the truth moves
    assert run["conditions"]["blur"]["truth"] != run["conditions"]["none"]["truth"]
    assert "targets" in stdout and "Spearman" in stdout
