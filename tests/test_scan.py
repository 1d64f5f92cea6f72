"""Tests of lambdaskip.scan: every backend against the sequential reference (the oracle).

Bars (issue 4): relative error (Frobenius norm of the difference over the norm of the reference)
≤ 1e-10 in float64 and ≤ 1e-4 in float32, forward and backward, with and without D, for decays
near 0 and near 1, L from 1 to 16384. Sizes are small so the file runs in seconds on one core.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lambdaskip import scan
from lambdaskip.scan import chunked as chunked_mod

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# the CPU backends besides the oracle: the PyTorch ones and the compiled "fused" kernel (CI has a C++
# compiler, so it is tested there; without one it is absent). Triton has its own test file.
PT_BACKENDS = [name for name in scan.available_backends("cpu") if name in ("chunked", "parallel", "fused")]
FAST_BACKENDS = [name for name in PT_BACKENDS if name != "parallel"]  # the ones meant for long sequences


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def s6_inputs(b, c, n, L, dtype=torch.float64, regime="mixed", with_D=True, with_h0=False, grad=False, seed=0):
    """Random Mamba-1 inputs. ``regime`` sets the per-step log-decay Δ·A: ``near0`` ≈ −30 (decay
    ≈ 1e-13), ``near1`` ≈ −1e-5, ``mixed`` spans both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, L, generator=g, dtype=dtype)
    if regime == "near0":
        delta = 1.0 + torch.rand(b, c, L, generator=g, dtype=dtype)
        A = -15.0 - 5 * torch.rand(c, n, generator=g, dtype=dtype)
    elif regime == "near1":
        delta = 1e-4 * torch.rand(b, c, L, generator=g, dtype=dtype)
        A = -0.1 * torch.rand(c, n, generator=g, dtype=dtype)
    else:
        delta = torch.exp(4 * torch.rand(b, c, L, generator=g, dtype=dtype) - 5)  # 7e-3 .. 0.4
        A = -torch.exp(6 * torch.rand(c, n, generator=g, dtype=dtype) - 3)  # -0.05 .. -20
    B = torch.randn(b, n, L, generator=g, dtype=dtype)
    C = torch.randn(b, n, L, generator=g, dtype=dtype)
    D = torch.randn(c, generator=g, dtype=dtype) if with_D else None
    h0 = torch.randn(b, c, n, generator=g, dtype=dtype) if with_h0 else None
    out = [x, delta, A, B, C, D, h0]
    if grad:
        out = [t.requires_grad_() if t is not None else None for t in out]
    return out


def ssd_inputs(b, H, L, p, n, dtype=torch.float64, regime="mixed", with_D=True, with_h0=False, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, H, L, p, generator=g, dtype=dtype)
    r = torch.rand(b, H, L, generator=g, dtype=dtype)
    log_decay = {"near0": -30.0 - 10 * r, "near1": -1e-5 * r, "mixed": -torch.exp(8 * r - 6)}[regime]
    B = torch.randn(b, H, L, n, generator=g, dtype=dtype)
    C = torch.randn(b, H, L, n, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype) if with_D else None
    h0 = torch.randn(b, H, n, p, generator=g, dtype=dtype) if with_h0 else None
    out = [x, log_decay, B, C, D, h0]
    if grad:
        out = [t.requires_grad_() if t is not None else None for t in out]
    return out


def run_s6(inputs, backend, **kw):
    x, delta, A, B, C, D, h0 = inputs
    return scan.selective_scan(x, delta, A, B, C, D, backend=backend, initial_state=h0, return_final_state=True, **kw)


def run_ssd(inputs, backend):
    x, ld, B, C, D, h0 = inputs
    return scan.ssd_scan(x, ld, B, C, D, backend=backend, initial_state=h0, return_final_state=True)


# ------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", PT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("regime", ["mixed", "near0", "near1"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 7), (3, 5, 16, 129), (2, 4, 3, 1000)])
def test_selective_forward_matches_reference(backend, dtype, regime, shape):
    b, c, n, L = shape
    inp = s6_inputs(b, c, n, L, dtype, regime, with_D=L % 2 == 1, with_h0=L > 100)
    y_ref, h_ref = run_s6([t.double() if t is not None else None for t in inp], "reference")
    y, h = run_s6(inp, backend)
    assert y.dtype == dtype and y.shape == (b, c, L) and h.shape == (b, c, n)
    assert rel(y.double(), y_ref) <= TOL[dtype]
    assert rel(h.double(), h_ref) <= TOL[dtype]


@pytest.mark.parametrize("backend", PT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("regime", ["mixed", "near0", "near1"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 7, 2, 4), (1, 2, 200, 3, 5)])
def test_ssd_forward_matches_reference(backend, dtype, regime, shape):
    b, H, L, p, n = shape
    inp = ssd_inputs(b, H, L, p, n, dtype, regime, with_D=L > 1, with_h0=L == 7)
    y_ref, h_ref = run_ssd([t.double() if t is not None else None for t in inp], "reference")
    y, h = run_ssd(inp, backend)
    assert y.shape == (b, H, L, p) and h.shape == (b, H, n, p)
    assert rel(y.double(), y_ref) <= TOL[dtype]
    assert rel(h.double(), h_ref) <= TOL[dtype]


@pytest.mark.parametrize("regime", ["mixed", "near0", "near1"])
def test_long_sequence_16384(regime):
    """L = 16384: chunked and fused in float64 and float32 against the float64 loop, Mamba-1 and SSD."""
    L = 16384
    inp = s6_inputs(1, 2, 2, L, torch.float64, regime, with_D=True)
    y_ref, h_ref = run_s6(inp, "reference")
    assert torch.isfinite(y_ref).all()
    for backend in FAST_BACKENDS:
        for dtype in (torch.float64, torch.float32):
            y, h = run_s6([t.to(dtype) if t is not None else None for t in inp], backend)
            assert rel(y.double(), y_ref) <= TOL[dtype], (backend, dtype)
            assert rel(h.double(), h_ref) <= TOL[dtype], (backend, dtype)
    inp = ssd_inputs(1, 1, L, 2, 2, torch.float64, regime)
    y_ref, h_ref = run_ssd(inp, "reference")
    for backend in FAST_BACKENDS:
        for dtype in (torch.float64, torch.float32):
            y, h = run_ssd([t.to(dtype) if t is not None else None for t in inp], backend)
            assert rel(y.double(), y_ref) <= TOL[dtype], (backend, dtype)
            assert rel(h.double(), h_ref) <= TOL[dtype], (backend, dtype)


def test_extreme_decays_stay_finite():
    """Δ·A = −1e4 per step (decay underflows to exactly 0) and Δ = 0 (decay exactly 1): no NaN/Inf,
    and the results are the exact limits: a forgotten state, and a plain running sum."""
    L = 300
    x = torch.randn(1, 2, L, dtype=torch.float64)
    B = torch.ones(1, 1, L, dtype=torch.float64)
    C = torch.ones(1, 1, L, dtype=torch.float64)
    A = torch.tensor([[-1e4], [0.0]], dtype=torch.float64)
    delta = torch.ones(1, 2, L, dtype=torch.float64)
    for backend in ["reference", *PT_BACKENDS]:
        y = scan.selective_scan(x, delta, A, B, C, backend=backend)
        assert torch.isfinite(y).all()
        assert torch.allclose(y[0, 0], x[0, 0], rtol=0, atol=1e-12)  # h_t = x_t: the past is forgotten
        assert torch.allclose(y[0, 1], torch.cumsum(x[0, 1], 0), rtol=1e-12, atol=1e-12)  # decay 1: running sum


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 64])
@pytest.mark.parametrize("L", [1, 2, 7, 64, 65, 100])
def test_linear_recurrence_every_chunking(chunk, L):
    """The two-level scan is exact for every chunk length, including remainders and T > L."""
    g = torch.Generator().manual_seed(L * 100 + chunk)
    a = torch.rand(L, 3, 2, generator=g, dtype=torch.float64)
    u = torch.randn(L, 3, 2, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    for init in (None, h0):
        h, expected = scan.linear_recurrence(a, u, init, chunk=chunk), []
        state = torch.zeros(3, 2, dtype=torch.float64) if init is None else init
        for t in range(L):
            state = a[t] * state + u[t]
            expected.append(state)
        assert rel(h, torch.stack(expected)) <= 1e-13
        assert rel(scan.linear_recurrence_parallel(a, u, init), torch.stack(expected)) <= 1e-13


@pytest.mark.parametrize("segment,chunk", [(1, None), (3, 2), (10, 4), (None, 1)])
def test_selective_chunked_segments(segment, chunk):
    inp = s6_inputs(2, 3, 4, 37, with_h0=True)
    y_ref, h_ref = run_s6(inp, "reference")
    x, delta, A, B, C, D, h0 = inp
    y, h = chunked_mod.selective_scan_chunked(x, delta, A, B, C, D, h0, True, chunk=chunk, segment=segment)
    assert rel(y, y_ref) <= 1e-12 and rel(h, h_ref) <= 1e-12


@pytest.mark.parametrize("regime", ["mixed", "near0", "near1"])
@pytest.mark.parametrize("L,segment,chunk", [(1, None, None), (37, None, None), (37, 10, 3), (300, 64, None),
                                             (300, None, 7), (1000, None, None)])
@pytest.mark.parametrize("with_h0", [False, True])
def test_selective_chunked_nograd_path_matches_autograd_path(regime, L, segment, chunk, with_h0):
    """The no-grad fast forward (taken when no input requires grad) and the autograd path agree
    with each other and with the loop, including padding, several segments and an initial state."""
    inp = s6_inputs(2, 5, 3, L, regime=regime, with_h0=with_h0)
    y_ref, h_ref = run_s6(inp, "reference")
    x, delta, A, B, C, D, h0 = inp
    y_fast, h_fast = chunked_mod.selective_scan_chunked(x, delta, A, B, C, D, h0, True, chunk=chunk, segment=segment)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inp]
    y_ad, h_ad = chunked_mod.selective_scan_chunked(*leaves, True, chunk=chunk, segment=segment)
    assert y_ad.requires_grad and not y_fast.requires_grad  # the two paths really were taken
    assert rel(y_fast, y_ref) <= 1e-12 and rel(h_fast, h_ref) <= 1e-12
    assert rel(y_fast, y_ad.detach()) <= 1e-12 and rel(h_fast, h_ad.detach()) <= 1e-12
    with torch.no_grad():  # no_grad also selects the fast path for inputs that require grad
        y_ng = chunked_mod.selective_scan_chunked(*leaves, chunk=chunk, segment=segment)
    assert rel(y_ng, y_ref) <= 1e-12


def test_selective_chunked_nograd_float32_long():
    """Float32 fast forward at a benchmark-like shape (several segments) against the float64 loop."""
    inp = s6_inputs(2, 8, 16, 2000, dtype=torch.float64)
    y_ref = scan.selective_scan(*inp[:6], backend="reference")
    y32 = scan.selective_scan(*[t.float() for t in inp[:6]], backend="chunked")
    assert rel(y32.double(), y_ref) <= TOL[torch.float32]


@pytest.mark.parametrize("chunk", [1, 3, 8, 40])
def test_ssd_chunked_chunk_sizes(chunk):
    inp = ssd_inputs(2, 2, 37, 3, 4, with_h0=True)
    y_ref, h_ref = run_ssd(inp, "reference")
    x, ld, B, C, D, h0 = inp
    y, h = chunked_mod.ssd_scan_chunked(x, ld, B, C, D, h0, True, chunk=chunk)
    assert rel(y, y_ref) <= 1e-12 and rel(h, h_ref) <= 1e-12


@settings(max_examples=12)
@given(
    b=st.integers(1, 3), c=st.integers(1, 6), n=st.integers(1, 5), L=st.integers(1, 90),
    with_D=st.booleans(), with_h0=st.booleans(), seed=st.integers(0, 10_000),
)
def test_selective_random_shapes(b, c, n, L, with_D, with_h0, seed):
    inp = s6_inputs(b, c, n, L, with_D=with_D, with_h0=with_h0, seed=seed)
    y_ref, h_ref = run_s6(inp, "reference")
    for backend in PT_BACKENDS:
        y, h = run_s6(inp, backend)
        assert rel(y, y_ref) <= 1e-10 and rel(h, h_ref) <= 1e-10


@settings(max_examples=12)
@given(
    b=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 150), p=st.integers(1, 4), n=st.integers(1, 4),
    with_D=st.booleans(), with_h0=st.booleans(), seed=st.integers(0, 10_000),
)
def test_ssd_random_shapes(b, H, L, p, n, with_D, with_h0, seed):
    inp = ssd_inputs(b, H, L, p, n, with_D=with_D, with_h0=with_h0, seed=seed)
    y_ref, h_ref = run_ssd(inp, "reference")
    for backend in PT_BACKENDS:
        y, h = run_ssd(inp, backend)
        assert rel(y, y_ref) <= 1e-10 and rel(h, h_ref) <= 1e-10


# ------------------------------------------------------------------------------------- matrices


def test_mixing_matrices_equal_scans():
    """The scan computes M·V without forming M: both agree, and M is causal (lower-triangular)."""
    x, delta, A, B, C, D, _ = s6_inputs(2, 3, 4, 20)
    M = scan.selective_scan_matrix(delta, A, B, C, D)
    assert M.shape == (2, 3, 20, 20)
    assert torch.equal(M.triu(1), torch.zeros_like(M))
    y = scan.selective_scan(x, delta, A, B, C, D, backend="reference")
    assert rel((M @ x[..., None]).squeeze(-1), y) <= 1e-12
    x, ld, B, C, D, _ = ssd_inputs(2, 3, 20, 4, 5)
    M = scan.ssd_matrix(ld, B, C, D)
    assert M.shape == (2, 3, 20, 20)
    assert rel(M @ x, scan.ssd_scan(x, ld, B, C, D, backend="reference")) <= 1e-12


def test_segsum_is_stable():
    """Segment sums are sums, not differences of long cumulative sums: exact for huge totals."""
    log_a = torch.full((1000,), -1e3, dtype=torch.float64)
    log_a[500] = -1.0
    s = scan.segsum(log_a)
    assert s[501, 500] == -1e3 and s[500, 499] == -1.0 and s[500, 500] == 0.0
    assert s[0, 1] == float("-inf")


# ------------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", ["reference", *PT_BACKENDS])
@pytest.mark.parametrize("L", [1, 6, 23])
def test_selective_gradcheck(backend, L):
    x, delta, A, B, C, D, h0 = s6_inputs(2, 2, 3, L, with_h0=True, grad=True)

    def f(x, delta, A, B, C, D, h0):
        return scan.selective_scan(x, delta, A, B, C, D, backend=backend, initial_state=h0, return_final_state=True)

    assert torch.autograd.gradcheck(f, (x, delta, A, B, C, D, h0))


def test_chunked_gradcheck_many_chunks():
    """Gradients through several chunks, several segments and a remainder (T=3, segments of 10)."""
    x, delta, A, B, C, D, h0 = s6_inputs(1, 2, 2, 23, with_h0=True, grad=True)

    def f(x, delta, A, B, C, D, h0):
        return chunked_mod.selective_scan_chunked(x, delta, A, B, C, D, h0, True, chunk=3, segment=10)

    assert torch.autograd.gradcheck(f, (x, delta, A, B, C, D, h0))
    x, ld, B, C, D, h0 = ssd_inputs(1, 1, 11, 2, 2, with_h0=True, grad=True)

    def g(x, ld, B, C, D, h0):
        return chunked_mod.ssd_scan_chunked(x, ld, B, C, D, h0, True, chunk=3)

    assert torch.autograd.gradcheck(g, (x, ld, B, C, D, h0))


@pytest.mark.parametrize("backend", PT_BACKENDS)
@pytest.mark.parametrize("L", [1, 9])
def test_ssd_gradcheck(backend, L):
    x, ld, B, C, D, h0 = ssd_inputs(1, 1, L, 2, 2, with_h0=True, grad=True)

    def f(x, ld, B, C, D, h0):
        return scan.ssd_scan(x, ld, B, C, D, backend=backend, initial_state=h0, return_final_state=True)

    assert torch.autograd.gradcheck(f, (x, ld, B, C, D, h0))


def _grads(fn, inputs, seed=1):
    outs = fn(inputs)
    g = torch.Generator().manual_seed(seed)
    # weights drawn in float64 then cast, so float32 and float64 runs see the same loss
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", PT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("regime", ["mixed", "near0", "near1"])
def test_backward_matches_reference(backend, dtype, regime):
    L = 200 if backend == "parallel" else 700
    inp = s6_inputs(2, 3, 4, L, dtype, regime, with_h0=True, grad=True)
    ref_inp = [t.detach().double().requires_grad_() for t in inp]
    g_ref = _grads(lambda i: run_s6(i, "reference"), ref_inp)
    g = _grads(lambda i: run_s6(i, backend), inp)
    for name, a, b in zip(["x", "delta", "A", "B", "C", "D", "h0"], g, g_ref):
        assert rel(a.double(), b) <= TOL[dtype], name
    inp = ssd_inputs(1, 2, L, 3, 4, dtype, regime, with_h0=True, grad=True)
    ref_inp = [t.detach().double().requires_grad_() for t in inp]
    g_ref = _grads(lambda i: run_ssd(i, "reference"), ref_inp)
    g = _grads(lambda i: run_ssd(i, backend), inp)
    for name, a, b in zip(["x", "log_decay", "B", "C", "D", "h0"], g, g_ref):
        assert rel(a.double(), b) <= TOL[dtype], name


def test_backward_long_sequence():
    """Backward at L = 4096 (float32 against the float64 loop)."""
    inp = s6_inputs(1, 2, 2, 4096, torch.float64, "mixed", grad=True)
    g_ref = _grads(lambda i: run_s6(i, "reference"), inp)
    for backend in FAST_BACKENDS:
        f32 = [t.detach().float().requires_grad_() for t in inp if t is not None] + [None]
        g = _grads(lambda i: run_s6(i, backend), f32)
        for name, a, b in zip(["x", "delta", "A", "B", "C", "D"], g, g_ref):
            assert rel(a.double(), b) <= 1e-4, (backend, name)


# ------------------------------------------------------------------------------------- errors


def test_bad_inputs_name_the_argument():
    x, delta, A, B, C, D, _ = s6_inputs(2, 3, 4, 5)
    cases = [
        (dict(x=x[0]), ValueError, "x must have shape"),
        (dict(delta=delta[:, :2]), ValueError, "delta must have shape"),
        (dict(A=A[:2]), ValueError, "A must have shape"),
        (dict(B=B[:, :, :4]), ValueError, "B must have shape"),
        (dict(C=C[:, :3]), ValueError, "C must have shape"),
        (dict(D=D[:2]), ValueError, "D must have shape"),
        (dict(B=B.float()), TypeError, "B must have the same dtype"),
        (dict(x=x.long(), delta=delta.long()), TypeError, "x must have a floating-point dtype"),
        (dict(x=x.tolist()), TypeError, "x must be a torch.Tensor"),
        (dict(delta=-delta), ValueError, "delta must be >= 0"),
        (dict(A=-A), ValueError, "A must be <= 0"),
        (dict(C=C.clone().index_fill_(2, torch.tensor([1]), float("nan"))), ValueError, "C contains NaN"),
        (dict(x=x.clone().index_fill_(2, torch.tensor([0]), float("inf"))), ValueError, "x contains NaN or Inf"),
        (dict(x=x[:, :, :0], delta=delta[:, :, :0], B=B[:, :, :0], C=C[:, :, :0]), ValueError, "x must have batch"),
    ]
    base = dict(x=x, delta=delta, A=A, B=B, C=C, D=D)
    for change, exc, msg in cases:
        args = {**base, **change}
        with pytest.raises(exc, match=msg):
            scan.selective_scan(**args)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        scan.selective_scan(x, delta, A, B, C, initial_state=torch.zeros(2, 3, 5, dtype=x.dtype))
    with pytest.raises(ValueError, match="backend must be one of"):
        scan.selective_scan(x, delta, A, B, C, backend="cuda")

    x, ld, B, C, D, _ = ssd_inputs(1, 2, 5, 3, 4)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        scan.ssd_scan(x, -ld, B, C)
    with pytest.raises(ValueError, match="log_decay must have shape"):
        scan.ssd_scan(x, ld[..., :4], B, C)
    with pytest.raises(ValueError, match="C must have shape"):
        scan.ssd_scan(x, ld, B, C[..., :3])
    with pytest.raises(ValueError, match="D must have shape"):
        scan.ssd_scan(x, ld, B, C, torch.ones(3, dtype=x.dtype))
    with pytest.raises(TypeError, match="B must have the same dtype"):
        scan.ssd_scan(x, ld, B.float(), C)
    with pytest.raises(ValueError, match="x contains NaN"):
        scan.ssd_scan(x * float("nan"), ld, B, C)


def test_auto_backend_and_no_gpu_imports():
    """On a CPU, "auto" is the fused kernel (the chunked backend where it cannot be compiled),
    "triton" is refused with a clear message unless interpreted, and running a scan never imports
    Triton (checked in a fresh interpreter)."""
    assert scan.resolve_backend("auto", "cpu") == ("fused" if "fused" in PT_BACKENDS else "chunked")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend='triton' cannot run here"):
            scan.resolve_backend("triton", "cpu")
    code = (
        "import os, sys, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from lambdaskip import scan\n"
        "x = torch.randn(1, 2, 8); y = scan.selective_scan(x, torch.rand(1, 2, 8), -torch.rand(2, 3), "
        "torch.randn(1, 3, 8), torch.randn(1, 3, 8))\n"
        "assert 'triton' not in sys.modules and 'lambdaskip.scan.triton_backend' not in sys.modules\n"
        "if not torch.cuda.is_available():\n"
        "    try:\n"
        "        scan.resolve_backend('triton', 'cpu')\n"
        "        raise SystemExit('triton accepted on CPU without the interpreter')\n"
        "    except ValueError as e:\n"
        "        assert \"backend='triton' cannot run here\" in str(e)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("fn", [scan.linear_recurrence, scan.linear_recurrence_parallel])
def test_linear_recurrence_rejects_bad_arguments(fn):
    """Regression: mismatched shapes, L = 0 and a bad h0 used to fail deep inside the kernel with a
    reshape/broadcast RuntimeError (or broadcast silently); now a ValueError/TypeError names them."""
    a, u = torch.rand(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="a must have shape"):
        fn(a[:, :1], u)
    with pytest.raises(ValueError, match="L >= 1"):
        fn(a[:0], u[:0])
    with pytest.raises(ValueError, match="h0 must have shape"):
        fn(a, u, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="u must have the same dtype"):
        fn(a, u.float())
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        fn(a.tolist(), u)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_linear_recurrence_rejects_bad_chunk(chunk):
    """Regression: chunk=0 / negative / float / bool used to be clamped silently to a valid length."""
    a, u = torch.rand(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        scan.linear_recurrence(a, u, chunk=chunk)
