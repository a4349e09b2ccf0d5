"""Bandwidth benchmark of the mixture fusion: fused op vs unfused PyTorch vs the copy floor.

The fusion is memory-bound: per pixel it reads ``2C + 1`` logits and writes ``C`` log-probs, with
a few transcendental ops each. The floor is the time a plain ``copy_`` would need to move those
bytes on the same device, measured in the same run::

    bytes(forward)  = 2*B*C*H*W*elt (z0, z1) + B*H*W*elt (e) + B*C*H*W*4 (float32 output)
    bytes(backward) = B*C*H*W*4 (upstream grad) + 2*B*C*H*W*elt + B*H*W*elt (inputs again)
                      + 2*B*C*H*W*elt + B*H*W*elt (the three input gradients)
    floor           = bytes / copy bandwidth,  copy bandwidth = 2 * nbytes / time(dst.copy_(src))

Printed ratios: ``fused / floor`` (1.0 is the best possible) and ``unfused / fused`` (speed-up).
``--placement`` instead measures where the fusion should happen (at the logits' stride, then
upsample; or upsample, then fuse at full resolution): time, peak memory and label agreement.

Examples::

    python benchmarks/fusion.py                                   # CPU, reduced sizes
    python benchmarks/fusion.py --device cuda --dtype bfloat16 --json fusion_h100.json
    python benchmarks/fusion.py --sizes 1x19x1024x2048 1x150x512x512 --repeats 20
    python benchmarks/fusion.py --placement --json placement.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from errwrap.heads import mixture_log_probs
from errwrap.ops.fusion import (
    _resolve_backend,
    fused_labels_and_error_prob,
    fused_mixture_log_probs,
)

GPU_SIZES = ["1x19x1024x2048", "1x150x512x512"]
CPU_SIZES = ["1x19x256x512", "1x150x128x256"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 3:
        parts = [1, *parts]
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW or CxHxW, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on a buffer of ``nbytes``."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * n * 4 / t


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd keeps for the backward of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_case(size, device, dtype, repeats, backward, compile_ref) -> list[dict]:
    b, c, h, w = size
    g = torch.Generator(device="cpu").manual_seed(0)
    z0 = (torch.randn(b, c, h, w, generator=g) * 3).to(device=device, dtype=dtype)
    z1 = (torch.randn(b, c, h, w, generator=g) * 3).to(device=device, dtype=dtype)
    e = torch.randn(b, 1, h, w, generator=g).to(device=device, dtype=dtype)
    elt, n, pix = z0.element_size(), b * c * h * w, b * h * w
    nbytes = {"fwd": 2 * n * elt + pix * elt + n * 4}
    nbytes["fwd+bwd"] = nbytes["fwd"] + n * 4 + 2 * (2 * n * elt + pix * elt)
    backend = _resolve_backend("auto", z0)
    impls: dict[str, Callable] = {
        f"fused[{backend}]": lambda *t: fused_mixture_log_probs(*t, backend=backend),
        "unfused": mixture_log_probs,
    }
    if compile_ref:
        impls["unfused+inductor"] = torch.compile(mixture_log_probs, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (z0, z1, e)]
    grad = torch.randn(b, c, h, w, device=device)
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for name, fn in impls.items():
        fns[name, "fwd"] = functools.partial(fn, z0, z1, e)
        if backward:
            fns[name, "fwd+bwd"] = functools.partial(lambda f: torch.autograd.grad(f(*leaves), leaves, grad), fn)
    fns[f"labels[{backend}]", "fwd"] = functools.partial(fused_labels_and_error_prob, z0, z1, e, backend=backend)
    times = interleaved(fns, device, repeats)  # type: ignore[arg-type]
    rows = []
    for (name, step), t in times.items():
        row = {"size": "x".join(map(str, size)), "impl": name, "pass": step, "time_ms": t * 1e3, "bytes": nbytes[step]}
        if name.startswith("labels"):
            row["bytes"] = 2 * n * elt + pix * elt + pix * (8 + 4)  # int64 label + float32 probability
        if step == "fwd+bwd":
            row["saved_MB"] = saved_bytes(functools.partial(impls[name], *leaves)) / 2**20
        rows.append(row)
    return rows


def run_bandwidth(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sizes = args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    sizes = [parse_size(s) if isinstance(s, str) else s for s in sizes]
    note = ""
    if device.type != "cuda" and not args.sizes:
        note = f"CPU run: default sizes reduced from {GPU_SIZES} to {CPU_SIZES} (pass --sizes for others)"
        print(note)
    largest = max(2 * math.prod(s) * DTYPES[args.dtype].itemsize + math.prod(s) * 4 for s in sizes)
    bandwidth = copy_bandwidth(device, max(largest, 64 * 2**20), args.repeats)
    print(f"device {device} ({device_name(device)}), dtype {args.dtype}, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for size in sizes:
        case = bench_case(size, device, dtype, args.repeats, not args.no_backward, args.compile)
        fused = {r["pass"]: r["time_ms"] for r in case if r["impl"].startswith("fused")}
        for r in case:
            r["floor_ms"] = r["bytes"] / bandwidth * 1e3
            r["GB/s"] = r["bytes"] / (r["time_ms"] * 1e-3) / 1e9
            r["x_floor"] = r["time_ms"] / r["floor_ms"]
            r["unfused/fused"] = r["time_ms"] / fused[r["pass"]] if r["impl"].startswith("unfused") else None
        rows += case
    print_table(rows, ["size", "impl", "pass", "time_ms", "floor_ms", "x_floor", "GB/s", "unfused/fused", "saved_MB"])
    return {
        "device": device_name(device),
        "dtype": args.dtype,
        "copy_GBps": bandwidth / 1e9,
        "note": note,
        "rows": rows,
    }


# --------------------------------------------------------------------------- placement
def smooth_inputs(c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random logits smooth at 1/8 of (h, w), bilinearly upsampled to (h, w)."""
    g = torch.Generator().manual_seed(seed)
    coarse = (max(1, h // 8), max(1, w // 8))
    out = []
    for channels, scale in ((c, 4.0), (c, 4.0), (1, 3.0)):
        x = torch.randn(1, channels, *coarse, generator=g) * scale
        out.append(F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False))
    return tuple(out)


def fuse_then_upsample(z0, z1, e, size):
    log_p = mixture_log_probs(z0, z1, e)
    return F.interpolate(log_p, size=size, mode="bilinear", align_corners=False).argmax(1)


def upsample_then_fuse(z0, z1, e, size):
    up = [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (z0, z1, e)]
    return fused_labels_and_error_prob(*up).labels


PLACEMENTS = {"native_stride": fuse_then_upsample, "full_resolution": upsample_then_fuse}


def placement_worker(name: str, c: int, h: int, w: int, stride: int, repeats: int) -> dict:
    """Run one placement in this (fresh) process: time and peak resident memory above inputs."""
    z0, z1, e = smooth_inputs(c, h // stride, w // stride)
    fn = PLACEMENTS[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # high-water mark, KiB on Linux
    fn(z0, z1, e, (h, w))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = timeit(lambda: fn(z0, z1, e, (h, w)), torch.device("cpu"), repeats, warmup=1)
    return {"placement": name, "time_ms": t * 1e3, "peak_rss_MB": peak / 1024, "rss_growth_MB": (peak - before) / 1024}


def run_placement(args: argparse.Namespace) -> dict:
    c, h, w, stride = args.placement_classes, args.placement_size[0], args.placement_size[1], args.stride
    print(f"placement: C={c}, output {h}x{w}, logits at stride {stride} ({h // stride}x{w // stride}), CPU float32")
    rows = []
    for name in PLACEMENTS:
        cmd = [sys.executable, __file__, "--_placement-worker", name, "--placement-classes", str(c),
               "--placement-size", str(h), str(w), "--stride", str(stride), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    z0, z1, e = smooth_inputs(c, h // stride, w // stride)
    native = fuse_then_upsample(z0, z1, e, (h, w))
    full = upsample_then_fuse(z0, z1, e, (h, w))
    differ = native != full
    near = near_boundary(full, radius=2)
    rows.append({"placement": "labels differ", "fraction": differ.float().mean().item()})
    rows.append({"placement": "of which <=2 px from a label boundary", "fraction": near[differ].float().mean().item()})
    rows.append({"placement": "(all pixels <=2 px from a boundary)", "fraction": near.float().mean().item()})
    print_table(rows, ["placement", "time_ms", "peak_rss_MB", "rss_growth_MB", "fraction"])
    return {"classes": c, "size": [h, w], "stride": stride, "rows": rows, "labels_differ": rows[-3]["fraction"]}


def near_boundary(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels with a different label within ``radius`` pixels (Chebyshev distance)."""
    near = torch.zeros_like(labels, dtype=torch.bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            near |= labels != torch.roll(labels, (dy, dx), dims=(-2, -1))
    return near


# --------------------------------------------------------------------------- output
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(col)) for col in columns] for r in rows]
    widths = [max(len(col), *(len(row[i]) for row in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(wd) for col, wd in zip(columns, widths, strict=False)))
    for row in cells:
        print("  ".join(v.ljust(wd) for v, wd in zip(row, widths, strict=False)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the logits (default: float32)"
    )
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, help=f"BxCxHxW cases (default: {GPU_SIZES} on CUDA, {CPU_SIZES} on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement; the median is reported")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(mixture_log_probs) (inductor)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--placement", action="store_true", help="measure fusion at the logits' stride vs at full resolution (CPU)"
    )
    parser.add_argument("--placement-classes", type=int, default=19)
    parser.add_argument("--placement-size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=4, help="stride of the logits for --placement")
    parser.add_argument("--_placement-worker", dest="worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        h, w = args.placement_size
        print(json.dumps(placement_worker(args.worker, args.placement_classes, h, w, args.stride, args.repeats)))
        return 0
    result = run_placement(args) if args.placement else run_bandwidth(args)
    result["command"] = " ".join(["python", "benchmarks/fusion.py", *(argv if argv is not None else sys.argv[1:])])
    result["torch"] = torch.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
