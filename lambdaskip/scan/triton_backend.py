"""The Triton backend (CUDA): one fused sequential scan per block of channels, state in registers.

This module imports :mod:`triton` at import time, so nothing imports it unless
``backend="triton"`` (or ``"auto"`` on a CUDA tensor with Triton installed) is asked for. On a
CPU the kernels run only under ``TRITON_INTERPRET=1`` (Triton's interpreter, about a millisecond
per loop step per program: for tests at tiny sizes only).

Design: a GPU has thousands of threads, while a layer has ``batch × channels × n`` independent
lanes (Mamba-1) or ``batch × heads × n × p`` (Mamba-2) — plenty of parallelism without
parallelising over time. So each program owns a block of lanes, keeps their state in registers,
and walks through time once: every input is read once and every output written once, which is the
memory-bound floor. Arithmetic is done in float32 for 16/32-bit inputs (fp32 accumulation) and in
float64 for float64 inputs.

Backward: the kernels are forward-only; gradients are computed by re-running the differentiable
chunked PyTorch backend on the same inputs (:class:`_TritonScan`), so the gradients are exactly the
chunked backend's, at the cost of one extra forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked import selective_scan_chunked, ssd_scan_chunked

__all__ = ["selective_scan_triton", "ssd_scan_triton"]


@triton.jit
def _s6_fwd_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hlast_ptr,
                   n_channels, L, n_state,
                   HAS_H0: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, F64: tl.constexpr):
    # program (batch b, channel block): contiguous x, dt, y: (b, c, L); A: (c, n); B, C: (b, n, L)
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    mask_c = offs_c < n_channels
    mask_n = offs_n < n_state
    mask_cn = mask_c[:, None] & mask_n[None, :]
    acc = tl.float64 if F64 else tl.float32
    A = tl.load(A_ptr + offs_c[:, None] * n_state + offs_n[None, :], mask=mask_cn, other=0.0).to(acc)
    state_offs = pid_b * n_channels * n_state + offs_c[:, None] * n_state + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_cn, other=0.0).to(acc)
    else:
        h = tl.zeros((BLOCK_C, BLOCK_N), dtype=acc)
    row = pid_b * n_channels * L + offs_c * L  # start of each channel's time series
    bc_row = pid_b * n_state * L + offs_n * L
    for t in range(L):
        dt = tl.load(dt_ptr + row + t, mask=mask_c, other=0.0).to(acc)
        xv = tl.load(x_ptr + row + t, mask=mask_c, other=0.0).to(acc)
        Bv = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(acc)
        Cv = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(acc)
        h = tl.exp(dt[:, None] * A) * h + (dt * xv)[:, None] * Bv[None, :]
        yv = tl.sum(h * Cv[None, :], axis=1)
        tl.store(y_ptr + row + t, yv.to(y_ptr.dtype.element_ty), mask=mask_c)
    tl.store(hlast_ptr + state_offs, h.to(hlast_ptr.dtype.element_ty), mask=mask_cn)


@triton.jit
def _ssd_fwd_kernel(x_ptr, ld_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hlast_ptr,
                    L, n_state, p_dim,
                    HAS_H0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, F64: tl.constexpr):
    # program (batch·head bh, block of p): contiguous x, y: (bh, L, p); ld: (bh, L); B, C: (bh, L, n)
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < n_state
    mask_p = offs_p < p_dim
    mask_np = mask_n[:, None] & mask_p[None, :]
    acc = tl.float64 if F64 else tl.float32
    state_offs = pid_bh * n_state * p_dim + offs_n[:, None] * p_dim + offs_p[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + state_offs, mask=mask_np, other=0.0).to(acc)
    else:
        S = tl.zeros((BLOCK_N, BLOCK_P), dtype=acc)
    for t in range(L):
        a = tl.exp(tl.load(ld_ptr + pid_bh * L + t).to(acc))
        xv = tl.load(x_ptr + (pid_bh * L + t) * p_dim + offs_p, mask=mask_p, other=0.0).to(acc)
        Bv = tl.load(B_ptr + (pid_bh * L + t) * n_state + offs_n, mask=mask_n, other=0.0).to(acc)
        Cv = tl.load(C_ptr + (pid_bh * L + t) * n_state + offs_n, mask=mask_n, other=0.0).to(acc)
        S = a * S + Bv[:, None] * xv[None, :]
        yv = tl.sum(S * Cv[:, None], axis=0)
        tl.store(y_ptr + (pid_bh * L + t) * p_dim + offs_p, yv.to(y_ptr.dtype.element_ty), mask=mask_p)
    tl.store(hlast_ptr + state_offs, S.to(hlast_ptr.dtype.element_ty), mask=mask_np)


def _s6_forward(x, delta, A, B, C, h0):
    b, c, L = x.shape
    n = A.shape[1]
    x, delta, A, B, C = (t.contiguous() for t in (x, delta, A, B, C))
    y = torch.empty_like(x)
    hlast = torch.empty(b, c, n, dtype=x.dtype, device=x.device)
    BLOCK_N = triton.next_power_of_2(n)
    BLOCK_C = max(1, min(triton.next_power_of_2(c), max(1, 2048 // BLOCK_N), 64))
    grid = (b, triton.cdiv(c, BLOCK_C))
    _s6_fwd_kernel[grid](x, delta, A, B, C, h0.contiguous() if h0 is not None else hlast, y, hlast,
                         c, L, n, HAS_H0=h0 is not None, BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N,
                         F64=x.dtype == torch.float64)
    return y, hlast


def _ssd_forward(x, log_decay, B, C, h0):
    b, H, L, p = x.shape
    n = B.shape[-1]
    x, log_decay, B, C = (t.contiguous() for t in (x, log_decay, B, C))
    y = torch.empty_like(x)
    hlast = torch.empty(b, H, n, p, dtype=x.dtype, device=x.device)
    BLOCK_N = triton.next_power_of_2(n)
    BLOCK_P = max(1, min(triton.next_power_of_2(p), max(1, 4096 // BLOCK_N), 64))
    grid = (b * H, triton.cdiv(p, BLOCK_P))
    _ssd_fwd_kernel[grid](x, log_decay, B, C, h0.contiguous() if h0 is not None else hlast, y, hlast,
                          L, n, p, HAS_H0=h0 is not None, BLOCK_N=BLOCK_N, BLOCK_P=BLOCK_P,
                          F64=x.dtype == torch.float64)
    return y, hlast


class _TritonScan(torch.autograd.Function):
    """Forward with a Triton kernel; backward by differentiating the chunked backend (recompute)."""

    @staticmethod
    def forward(ctx, layout, *args):
        inputs = args[:-1]  # the last arg is the initial state (or None)
        h0 = args[-1]
        ctx.layout = layout
        ctx.n_in = len(inputs)
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(*inputs, *(() if h0 is None else (h0,)))
        forward = _s6_forward if layout == "s6" else _ssd_forward
        return forward(*inputs, h0)

    @staticmethod
    def backward(ctx, dy, dh):
        k = ctx.n_in
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        h0_leaf = leaves[k] if ctx.has_h0 else None
        chunked = selective_scan_chunked if ctx.layout == "s6" else ssd_scan_chunked
        with torch.enable_grad():
            y, hlast = chunked(*leaves[:k], None, h0_leaf, True)
            grads = torch.autograd.grad((y, hlast), leaves, (dy, dh), allow_unused=True)
        return (None, *grads[:k], grads[k] if ctx.has_h0 else None)


def selective_scan_triton(x, delta, A, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-1 layout with the Triton kernel (same contract as the reference)."""
    y, hlast = _TritonScan.apply("s6", x, delta, A, B, C, initial_state)
    if D is not None:
        y = y + D[:, None] * x
    return (y, hlast) if return_final_state else y


def ssd_scan_triton(x, log_decay, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-2 / SSD layout with the Triton kernel (same contract as the reference)."""
    y, hlast = _TritonScan.apply("ssd", x, log_decay, B, C, initial_state)
    if D is not None:
        y = y + D[None, :, None, None] * x
    return (y, hlast) if return_final_state else y
