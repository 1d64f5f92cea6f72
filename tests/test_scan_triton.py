"""The Triton backend against the reference, on CPU through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter runs about a millisecond per loop step per program, so the sizes are tiny. Skipped
with a reason when Triton is not installed. On a CUDA machine the same tests run on the GPU as well.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from lambdaskip import scan

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel(a, b):
    return float((a - b).norm() / b.norm())  # callers pass detached results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled kernels need a GPU")
@pytest.mark.parametrize("L", [1, 37, 1000])
def test_triton_on_cuda(L):
    """On a GPU, the compiled kernels (not the interpreter) against the float64 loop on the CPU.
    Listed before the interpreted tests, whose fixture switches the interpreter on."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: this test is for the compiled kernels")
    g = torch.Generator().manual_seed(L)
    b, c, n = 2, 40, 16
    cpu = [torch.randn(b, c, L, generator=g), torch.rand(b, c, L, generator=g), -4 * torch.rand(c, n, generator=g),
           torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g), torch.randn(c, generator=g)]
    ref = [t.double().requires_grad_() for t in cpu]
    y_ref = scan.selective_scan(*ref, backend="reference")
    gpu = [t.cuda().requires_grad_() for t in cpu]
    assert scan.resolve_backend("auto", "cuda") == "triton"
    y = scan.selective_scan(*gpu, backend="triton")
    assert rel(y.detach().cpu().double(), y_ref.detach()) <= 1e-4
    w = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    g_ref = torch.autograd.grad((y_ref * w).sum(), ref)
    g_gpu = torch.autograd.grad((y * w.float().cuda()).sum(), gpu)
    for name, a, b_ in zip(["x", "delta", "A", "B", "C", "D"], g_gpu, g_ref):
        assert rel(a.cpu().double(), b_) <= 1e-4, name
    H, p = 3, 8
    xs, ld = torch.randn(b, H, L, p, generator=g), -torch.rand(b, H, L, generator=g)
    Bs, Cs = torch.randn(b, H, L, n, generator=g), torch.randn(b, H, L, n, generator=g)
    ys = scan.ssd_scan(*(t.cuda() for t in (xs, ld, Bs, Cs)), backend="triton")
    ys_ref = scan.ssd_scan(*(t.double() for t in (xs, ld, Bs, Cs)), backend="reference")
    assert rel(ys.cpu().double(), ys_ref) <= 1e-4


@pytest.fixture(scope="module")
def interpreted():
    """Set TRITON_INTERPRET=1 while this module runs (Triton reads it when kernels are decorated,
    hence the fresh import of the backend) and restore everything afterwards."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import lambdaskip.scan.triton_backend as tb

    importlib.reload(tb)
    yield tb
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old
    importlib.reload(tb)


def _s6(dtype, b=2, c=3, n=4, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, L, generator=g, dtype=dtype)
    delta = torch.rand(b, c, L, generator=g, dtype=dtype)
    A = -3 * torch.rand(c, n, generator=g, dtype=dtype)
    B = torch.randn(b, n, L, generator=g, dtype=dtype)
    C = torch.randn(b, n, L, generator=g, dtype=dtype)
    D = torch.randn(c, generator=g, dtype=dtype)
    h0 = torch.randn(b, c, n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, delta, A, B, C, D, h0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_selective_scan_forward_backward(interpreted, dtype):
    assert "triton" in scan.available_backends("cpu")
    inp = _s6(dtype)
    x, delta, A, B, C, D, h0 = inp
    y, h = scan.selective_scan(x, delta, A, B, C, D, backend="triton", initial_state=h0, return_final_state=True)
    ref = [t.detach().double().requires_grad_() for t in inp]
    y_ref, h_ref = scan.selective_scan(*ref[:6], backend="reference", initial_state=ref[6], return_final_state=True)
    assert rel(y.detach().double(), y_ref.detach()) <= TOL[dtype] and rel(h.detach().double(), h_ref.detach()) <= TOL[dtype]
    w = torch.randn_like(y_ref)
    g = torch.autograd.grad((y * w.to(dtype)).sum() + h.sum(), inp)
    g_ref = torch.autograd.grad((y_ref * w).sum() + h_ref.sum(), ref)
    for name, a, b in zip(["x", "delta", "A", "B", "C", "D", "h0"], g, g_ref):
        assert rel(a.double(), b) <= TOL[dtype], name


def test_triton_selective_scan_odd_sizes_no_state(interpreted):
    """Channel and state counts that are not powers of two (masked lanes), L = 1, no D."""
    for L in (1, 4):
        x, delta, A, B, C, _, _ = (t.detach() for t in _s6(torch.float64, b=1, c=5, n=3, L=L, seed=L))
        y = scan.selective_scan(x, delta, A, B, C, backend="triton")
        assert rel(y, scan.selective_scan(x, delta, A, B, C, backend="reference")) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_ssd_scan_forward_backward(interpreted, dtype):
    g = torch.Generator().manual_seed(1)
    b, H, L, p, n = 1, 2, 5, 3, 5
    x = torch.randn(b, H, L, p, generator=g, dtype=dtype)
    ld = -2 * torch.rand(b, H, L, generator=g, dtype=dtype)
    B = torch.randn(b, H, L, n, generator=g, dtype=dtype)
    C = torch.randn(b, H, L, n, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, n, p, generator=g, dtype=dtype)
    inp = [t.requires_grad_() for t in (x, ld, B, C, D, h0)]
    y, h = scan.ssd_scan(*inp[:5], backend="triton", initial_state=inp[5], return_final_state=True)
    ref = [t.detach().double().requires_grad_() for t in inp]
    y_ref, h_ref = scan.ssd_scan(*ref[:5], backend="reference", initial_state=ref[5], return_final_state=True)
    assert rel(y.detach().double(), y_ref.detach()) <= TOL[dtype] and rel(h.detach().double(), h_ref.detach()) <= TOL[dtype]
    gr = torch.autograd.grad(y.sum() + h.sum(), inp)
    gr_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), ref)
    for name, a, b in zip(["x", "log_decay", "B", "C", "D", "h0"], gr, gr_ref):
        assert rel(a.double(), b) <= TOL[dtype], name
