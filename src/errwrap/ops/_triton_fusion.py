"""Triton kernels of the mixture fusion (forward, backward, labels); imported only on demand.

Each program handles ``BLOCK_P`` pixels of one image and walks the ``C`` channels in chunks of
``BLOCK_C``. When all channels fit in one chunk (``ONE_CHUNK``) the logits are read once and kept
in registers; otherwise a first pass computes the two log-sum-exps online (running maximum and
rescaled sum) and a second pass re-reads the chunks (mostly from L2) to write the output. The
math is float32 whatever the input dtype (fp32, fp16 or bf16).

Pixels are addressed by one flat index ``p = h * W + w`` with a stride per tensor, which covers
both NCHW-contiguous (pixel stride 1) and channels_last (channel stride 1) layouts; the caller
makes other layouts dense first.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors with
Triton's interpreter (slow; for tests only).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["mixture_bwd_kernel", "mixture_fwd_kernel", "mixture_labels_kernel"]


@triton.jit
def _log_sigmoids(e):
    """``(log sigmoid(e), log sigmoid(-e))``, stable for any finite ``e``."""
    log_p = tl.minimum(e, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(e)))
    return log_p, log_p - e


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))


@triton.jit
def _log_component(x, hi, log_sum, log_weight):
    """``log_softmax(x) + log_weight`` with ``hi = max(x)``, ``log_sum = log(sum(exp(x - hi)))``,
    rounded in PyTorch's order (``(x - hi) - log_sum`` first): logits of 1e4 lose no extra precision."""
    return ((x - hi[None, :]) - log_sum[None, :]) + log_weight[None, :]


@triton.jit
def _softmax(x, hi, log_sum):
    return tl.exp((x - hi[None, :]) - log_sum[None, :])


@triton.jit
def _chunk_ptrs(base, offs_c, offs_p, s_c, s_p):
    return base + offs_c[:, None] * s_c + offs_p[None, :] * s_p


@triton.jit
def _online_lse(ptr, b_off, s_c, s_p, offs_p, mask_p, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Log-sum-exp over ``C`` channels of ``BLOCK_P`` pixels, one chunk of channels at a time,
    as the pair ``(max, log(sum(exp(x - max))))``."""
    run_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c < C)[:, None] & mask_p[None, :]
        x = tl.load(_chunk_ptrs(ptr + b_off, offs_c, offs_p, s_c, s_p), mask=m, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(x, 0))
        new_max = tl.where(mask_p, new_max, 0.0)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max[None, :]), 0)
        run_max = new_max
    return run_max, tl.log(run_sum)


@triton.jit
def _tile_lse(x, mask_p):
    hi = tl.where(mask_p, tl.max(x, 0), 0.0)
    return hi, tl.log(tl.sum(tl.exp(x - hi[None, :]), 0))


@triton.jit
def mixture_fwd_kernel(
    z0_ptr, z1_ptr, e_ptr, out_ptr, C, P,
    s0b, s0c, s0p, s1b, s1c, s1p, seb, sep, sob, soc, sop,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(1).to(tl.int64)
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    e = tl.load(e_ptr + pid_b * seb + offs_p * sep, mask=mask_p, other=0.0).to(tl.float32)
    log_p, log_q = _log_sigmoids(e)
    if ONE_CHUNK:
        offs_c = tl.arange(0, BLOCK_C)
        m = (offs_c < C)[:, None] & mask_p[None, :]
        x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=float("-inf")).to(
            tl.float32
        )
        x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=float("-inf")).to(
            tl.float32
        )
        hi0, ls0 = _tile_lse(x0, mask_p)
        hi1, ls1 = _tile_lse(x1, mask_p)
        a = _log_component(x0, hi0, ls0, log_q)
        b = _log_component(x1, hi1, ls1, log_p)
        tl.store(_chunk_ptrs(out_ptr + pid_b * sob, offs_c, offs_p, soc, sop), _logaddexp(a, b), mask=m)
    else:
        hi0, ls0 = _online_lse(z0_ptr, pid_b * s0b, s0c, s0p, offs_p, mask_p, C, BLOCK_P, BLOCK_C)
        hi1, ls1 = _online_lse(z1_ptr, pid_b * s1b, s1c, s1p, offs_p, mask_p, C, BLOCK_P, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m = (offs_c < C)[:, None] & mask_p[None, :]
            x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=0.0).to(tl.float32)
            out = _logaddexp(_log_component(x0, hi0, ls0, log_q), _log_component(x1, hi1, ls1, log_p))
            tl.store(_chunk_ptrs(out_ptr + pid_b * sob, offs_c, offs_p, soc, sop), out, mask=m)


@triton.jit
def _bwd_terms(x0, x1, g, hi0, ls0, hi1, ls1, log_p, log_q, m):
    """``g * w0`` and ``g * w1``, with ``w0, w1`` the posterior responsibilities of the two
    mixture components (``w0 = sigmoid(a - b)``)."""
    a = _log_component(x0, hi0, ls0, log_q)
    b = _log_component(x1, hi1, ls1, log_p)
    w1 = tl.where(m, 1.0 / (1.0 + tl.exp(a - b)), 0.0)
    w0 = tl.where(m, 1.0 / (1.0 + tl.exp(b - a)), 0.0)
    return g * w0, g * w1


@triton.jit
def mixture_bwd_kernel(
    g_ptr, z0_ptr, z1_ptr, e_ptr, dz0_ptr, dz1_ptr, de_ptr, C, P,
    sgb, sgc, sgp, s0b, s0c, s0p, s1b, s1c, s1p, seb, sep,
    sd0b, sd0c, sd0p, sd1b, sd1c, sd1p, sdeb, sdep,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(1).to(tl.int64)
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    e = tl.load(e_ptr + pid_b * seb + offs_p * sep, mask=mask_p, other=0.0).to(tl.float32)
    log_p, log_q = _log_sigmoids(e)
    if ONE_CHUNK:
        offs_c = tl.arange(0, BLOCK_C)
        m = (offs_c < C)[:, None] & mask_p[None, :]
        x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=float("-inf")).to(
            tl.float32
        )
        x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=float("-inf")).to(
            tl.float32
        )
        g = tl.load(_chunk_ptrs(g_ptr + pid_b * sgb, offs_c, offs_p, sgc, sgp), mask=m, other=0.0).to(tl.float32)
        hi0, ls0 = _tile_lse(x0, mask_p)
        hi1, ls1 = _tile_lse(x1, mask_p)
        gw0, gw1 = _bwd_terms(x0, x1, g, hi0, ls0, hi1, ls1, log_p, log_q, m)
        sum0 = tl.sum(gw0, 0)
        sum1 = tl.sum(gw1, 0)
        dz0 = gw0 - _softmax(x0, hi0, ls0) * sum0[None, :]
        dz1 = gw1 - _softmax(x1, hi1, ls1) * sum1[None, :]
        tl.store(_chunk_ptrs(dz0_ptr + pid_b * sd0b, offs_c, offs_p, sd0c, sd0p), dz0, mask=m)
        tl.store(_chunk_ptrs(dz1_ptr + pid_b * sd1b, offs_c, offs_p, sd1c, sd1p), dz1, mask=m)
    else:
        hi0, ls0 = _online_lse(z0_ptr, pid_b * s0b, s0c, s0p, offs_p, mask_p, C, BLOCK_P, BLOCK_C)
        hi1, ls1 = _online_lse(z1_ptr, pid_b * s1b, s1c, s1p, offs_p, mask_p, C, BLOCK_P, BLOCK_C)
        sum0 = tl.zeros([BLOCK_P], tl.float32)
        sum1 = tl.zeros([BLOCK_P], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m = (offs_c < C)[:, None] & mask_p[None, :]
            x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=0.0).to(tl.float32)
            g = tl.load(_chunk_ptrs(g_ptr + pid_b * sgb, offs_c, offs_p, sgc, sgp), mask=m, other=0.0).to(tl.float32)
            gw0, gw1 = _bwd_terms(x0, x1, g, hi0, ls0, hi1, ls1, log_p, log_q, m)
            sum0 += tl.sum(gw0, 0)
            sum1 += tl.sum(gw1, 0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m = (offs_c < C)[:, None] & mask_p[None, :]
            x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=0.0).to(tl.float32)
            g = tl.load(_chunk_ptrs(g_ptr + pid_b * sgb, offs_c, offs_p, sgc, sgp), mask=m, other=0.0).to(tl.float32)
            gw0, gw1 = _bwd_terms(x0, x1, g, hi0, ls0, hi1, ls1, log_p, log_q, m)
            dz0 = gw0 - _softmax(x0, hi0, ls0) * sum0[None, :]
            dz1 = gw1 - _softmax(x1, hi1, ls1) * sum1[None, :]
            tl.store(_chunk_ptrs(dz0_ptr + pid_b * sd0b, offs_c, offs_p, sd0c, sd0p), dz0, mask=m)
            tl.store(_chunk_ptrs(dz1_ptr + pid_b * sd1b, offs_c, offs_p, sd1c, sd1p), dz1, mask=m)
    de = tl.exp(log_q) * sum1 - tl.exp(log_p) * sum0
    tl.store(de_ptr + pid_b * sdeb + offs_p * sdep, de, mask=mask_p)


@triton.jit
def mixture_labels_kernel(
    z0_ptr, z1_ptr, e_ptr, labels_ptr, prob_ptr, C, P,
    s0b, s0c, s0p, s1b, s1c, s1p, seb, sep,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(1).to(tl.int64)
    offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    mask_p = offs_p < P
    e = tl.load(e_ptr + pid_b * seb + offs_p * sep, mask=mask_p, other=0.0).to(tl.float32)
    log_p, log_q = _log_sigmoids(e)
    if ONE_CHUNK:
        offs_c = tl.arange(0, BLOCK_C)
        m = (offs_c < C)[:, None] & mask_p[None, :]
        x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=float("-inf")).to(
            tl.float32
        )
        x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=float("-inf")).to(
            tl.float32
        )
        hi0, ls0 = _tile_lse(x0, mask_p)
        hi1, ls1 = _tile_lse(x1, mask_p)
        a = _log_component(x0, hi0, ls0, log_q)
        b = _log_component(x1, hi1, ls1, log_p)
        out = tl.where(m, _logaddexp(a, b), float("-inf"))
        best = tl.argmax(out, 0, tie_break_left=True).to(tl.int64)
        best_val = tl.max(out, 0)
    else:
        hi0, ls0 = _online_lse(z0_ptr, pid_b * s0b, s0c, s0p, offs_p, mask_p, C, BLOCK_P, BLOCK_C)
        hi1, ls1 = _online_lse(z1_ptr, pid_b * s1b, s1c, s1p, offs_p, mask_p, C, BLOCK_P, BLOCK_C)
        best_val = tl.full([BLOCK_P], float("-inf"), tl.float32)
        best = tl.zeros([BLOCK_P], tl.int64)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m = (offs_c < C)[:, None] & mask_p[None, :]
            x0 = tl.load(_chunk_ptrs(z0_ptr + pid_b * s0b, offs_c, offs_p, s0c, s0p), mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(_chunk_ptrs(z1_ptr + pid_b * s1b, offs_c, offs_p, s1c, s1p), mask=m, other=0.0).to(tl.float32)
            out = _logaddexp(_log_component(x0, hi0, ls0, log_q), _log_component(x1, hi1, ls1, log_p))
            out = tl.where(m, out, float("-inf"))
            chunk_val, chunk_idx = tl.max(out, 0, return_indices=True, return_indices_tie_break_left=True)
            better = chunk_val > best_val
            best_val = tl.where(better, chunk_val, best_val)
            best = tl.where(better, chunk_idx.to(tl.int64) + c0, best)
    tl.store(labels_ptr + pid_b * P + offs_p, best, mask=mask_p)
    # P(the returned label is wrong) = 1 - max_c p_c, as ErrorCorrectionOutput.error_prob
    tl.store(prob_ptr + pid_b * P + offs_p, tl.minimum(tl.maximum(1.0 - tl.exp(best_val), 0.0), 1.0), mask=mask_p)
