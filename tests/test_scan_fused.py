"""The compiled CPU backend ("fused") beyond the shared backend tests in test_scan.py.

Covered here: the shapes that exercise every code path of the kernel (channel blocks of 16 with a
partial last block, time tiles of 64 and 16-step transposes with tails, the compile-time state size
16 and the run-time one), float16/bfloat16 inputs, non-contiguous inputs, gradients from the final
state alone, thread counts, the build cache, and the fallbacks when the kernel cannot be built.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lambdaskip import scan
from lambdaskip.scan import fused

pytestmark = pytest.mark.skipif(not fused.is_available(), reason=f"{fused.unavailable_reason()}")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def s6(b, c, n, L, dtype=torch.float64, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, L, generator=g, dtype=dtype)
    delta = torch.exp(6 * torch.rand(b, c, L, generator=g, dtype=dtype) - 6)  # 2.5e-3 .. 1
    A = -torch.exp(8 * torch.rand(c, n, generator=g, dtype=dtype) - 4)  # -0.02 .. -55: decays from ~1 to ~0
    B = torch.randn(b, n, L, generator=g, dtype=dtype)
    C = torch.randn(b, n, L, generator=g, dtype=dtype)
    D = torch.randn(c, generator=g, dtype=dtype)
    hinit = torch.randn(b, c, n, generator=g, dtype=dtype) if h0 else None
    return x, delta, A, B, C, D, hinit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1),       # everything minimal
    (2, 16, 16, 64),    # exactly one channel block and one time tile
    (1, 17, 16, 65),    # one full block + a block of 1; one tile + a 1-step tile
    (2, 40, 16, 203),   # partial last block, 16-step transposes with a tail of 11
    (1, 5, 7, 300),     # run-time state size
    (1, 3, 64, 33),     # larger state
])
def test_forward_and_final_state_match_reference(dtype, shape):
    b, c, n, L = shape
    x, delta, A, B, C, D, h0 = (t.to(dtype) for t in s6(*shape))
    ref = [t.double() for t in (x, delta, A, B, C, D, h0)]
    y_ref, h_ref = scan.selective_scan(*ref[:6], backend="reference", initial_state=ref[6], return_final_state=True)
    y, h = scan.selective_scan(x, delta, A, B, C, D, backend="fused", initial_state=h0, return_final_state=True)
    assert y.dtype == dtype and y.shape == (b, c, L) and h.shape == (b, c, n)
    assert rel(y.double(), y_ref) <= TOL[dtype] and rel(h.double(), h_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [16, 20])  # 16: compile-time size; 20: run-time size, 16 + a tail of 4 in the sums
def test_backward_matches_reference_with_partial_blocks(dtype, n):
    x, delta, A, B, C, D, h0 = s6(2, 19, n, 150)
    leaves = [t.to(dtype).requires_grad_() for t in (x, delta, A, B, C, D, h0)]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    g = torch.Generator().manual_seed(1)
    wy, wh = torch.randn(2, 19, 150, generator=g, dtype=torch.float64), torch.randn(2, 19, n, generator=g, dtype=torch.float64)
    for inputs, backend in ((leaves, "fused"), (ref, "reference")):
        y, h = scan.selective_scan(*inputs[:6], backend=backend, initial_state=inputs[6], return_final_state=True)
        ((y * wy.to(y.dtype)).sum() + (h * wh.to(h.dtype)).sum()).backward()
    for name, a, r in zip(["x", "delta", "A", "B", "C", "D", "h0"], leaves, ref):
        assert rel(a.grad.double(), r.grad) <= TOL[dtype], name


def test_gradient_from_the_final_state_only():
    """When only h_last is used, the output gradient is None inside the kernel: still exact."""
    x, delta, A, B, C, D, h0 = (t.requires_grad_() for t in s6(1, 3, 4, 40))

    def final_state(x, delta, A, B, C, D, h0):
        return scan.selective_scan(x, delta, A, B, C, D, backend="fused", initial_state=h0, return_final_state=True)[1]

    assert torch.autograd.gradcheck(final_state, (x, delta, A, B, C, D, h0))


def test_ssd_gradient_from_the_final_state_only():
    """Mamba-2: only S_last is used (dy is None inside the backward), over three time tiles of 64."""
    g = torch.Generator().manual_seed(4)
    x, B, C = (torch.randn(1, 2, 150, k, generator=g, dtype=torch.float64) for k in (3, 4, 4))
    ld = -torch.rand(1, 2, 150, generator=g, dtype=torch.float64) * 0.05
    S0 = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64)
    leaves = tuple(t.requires_grad_() for t in (x, ld, B, C, S0))

    def final_state(x, ld, B, C, S0):
        return scan.ssd_scan(x, ld, B, C, backend="fused", initial_state=S0, return_final_state=True)[1]

    assert torch.autograd.gradcheck(final_state, leaves)


def test_ssd_gradcheck_and_random_shapes():
    g = torch.Generator().manual_seed(3)
    for (b, H, L, p, n) in [(1, 1, 1, 1, 1), (2, 3, 37, 5, 4), (1, 2, 130, 16, 16)]:
        x = torch.randn(b, H, L, p, generator=g, dtype=torch.float64)
        ld = -torch.exp(6 * torch.rand(b, H, L, generator=g, dtype=torch.float64) - 5)
        B, C = torch.randn(b, H, L, n, generator=g, dtype=torch.float64), torch.randn(b, H, L, n, generator=g, dtype=torch.float64)
        D, S0 = torch.randn(H, generator=g, dtype=torch.float64), torch.randn(b, H, n, p, generator=g, dtype=torch.float64)
        y_ref, s_ref = scan.ssd_scan(x, ld, B, C, D, backend="reference", initial_state=S0, return_final_state=True)
        for dtype in (torch.float64, torch.float32):
            args = [t.to(dtype) for t in (x, ld, B, C, D)]
            y, s = scan.ssd_scan(*args, backend="fused", initial_state=S0.to(dtype), return_final_state=True)
            assert rel(y.double(), y_ref) <= TOL[dtype] and rel(s.double(), s_ref) <= TOL[dtype]
    leaves = [t.detach()[:, :, :9].clone().requires_grad_() if t.dim() > 2 else t.detach().clone().requires_grad_()
              for t in (x, ld, B, C)]
    assert torch.autograd.gradcheck(lambda *a: scan.ssd_scan(*a, backend="fused"), tuple(leaves))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    x, delta, A, B, C, D, _ = s6(2, 20, 16, 100, h0=False)
    low = [t.to(dtype) for t in (x, delta, A, B, C, D)]
    y = scan.selective_scan(*low, backend="fused")
    y_ref = scan.selective_scan(*(t.double() for t in low), backend="reference")  # same rounded inputs
    assert y.dtype == dtype
    assert rel(y.double(), y_ref) <= 1e-2  # only the output rounding to 8/11 bits remains


def test_non_contiguous_inputs():
    """Views in the mixer's natural (batch, L, channels) layout, transposed to the API's layout."""
    x, delta, A, B, C, D, h0 = s6(2, 20, 16, 70, dtype=torch.float32)
    xv, dv = x.transpose(1, 2).contiguous().transpose(1, 2), delta.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xv.is_contiguous()
    y = scan.selective_scan(xv, dv, A, B, C, D, backend="fused", initial_state=h0)
    assert torch.equal(y, scan.selective_scan(x, delta, A, B, C, D, backend="fused", initial_state=h0))


def test_same_result_on_one_and_two_threads():
    """Lanes are independent and the backward's sums over channels are written without atomics, so
    with batch >= threads neither pass depends on the thread count, bit for bit."""
    x, delta, A, B, C, D, h0 = (t.float() for t in s6(3, 40, 16, 90))
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in (x, delta, A, B, C)]
            y = scan.selective_scan(*leaves, D, backend="fused", initial_state=h0)
            y.square().sum().backward()
            out.append((y.detach(), [t.grad for t in leaves]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0], out[1][0])
    for g1, g2 in zip(out[0][1], out[1][1]):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("threads", [2, 4])
def test_backward_with_channel_groups_over_threads(threads):
    """Batch 1 on several threads: the channel blocks are split into groups (here 5 blocks of 16 into 2
    or 4 groups, the last one empty with 4), whose partial sums of dB and dC are added afterwards."""
    x, delta, A, B, C, D, h0 = s6(1, 80, 16, 130)
    ref = [t.clone().requires_grad_() for t in (x, delta, A, B, C, D, h0)]
    y = scan.selective_scan(*ref[:6], backend="reference", initial_state=ref[6])
    y.square().sum().backward()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        leaves = [t.float().requires_grad_() for t in (x, delta, A, B, C, D, h0)]
        y = scan.selective_scan(*leaves[:6], backend="fused", initial_state=leaves[6])
        y.square().sum().backward()
    finally:
        torch.set_num_threads(old)
    for name, a, r in zip(["x", "delta", "A", "B", "C", "D", "h0"], leaves, ref):
        assert rel(a.grad.double(), r.grad) <= TOL[torch.float32], name


def test_state_size_limit_is_a_clear_error():
    x, delta, _, _, _, _, _ = s6(1, 2, 1, 5, dtype=torch.float32)
    n = fused.MAX_STATE + 1
    A, B = -torch.rand(2, n), torch.randn(1, n, 5)
    with pytest.raises(ValueError, match="backend='fused' supports n <= 256"):
        scan.selective_scan(x, delta, A, B, B, backend="fused")


def test_auto_uses_chunked_beyond_the_state_size_limit():
    """`backend="auto"` must not fail where the kernel cannot run: n > 256 goes to the chunked backend."""
    x, delta, _, _, _, _, _ = s6(1, 2, 1, 5)
    n = fused.MAX_STATE + 1
    g = torch.Generator().manual_seed(1)
    A = -torch.rand(2, n, generator=g, dtype=torch.float64)
    B, C = torch.randn(1, n, 5, generator=g, dtype=torch.float64), torch.randn(1, n, 5, generator=g, dtype=torch.float64)
    assert scan.resolve_backend("auto", "cpu", state_size=n) == "chunked"
    y = scan.selective_scan(x, delta, A, B, C)
    assert rel(y, scan.selective_scan(x, delta, A, B, C, backend="reference")) <= 1e-10


@pytest.mark.parametrize("layout", ["s6", "ssd"])
def test_second_derivatives_are_refused_not_wrong(layout):
    """The kernels' backward passes are not differentiable: asking for a Hessian must raise, never
    silently return zeros."""
    if layout == "s6":
        x, delta, A, B, C, D, _ = s6(1, 3, 4, 6, h0=False)
        leaves = [t.clone().requires_grad_() for t in (x, delta, A, B, C)]
        y = scan.selective_scan(*leaves, D, backend="fused")
    else:
        g = torch.Generator().manual_seed(2)
        x, B, C = (torch.randn(1, 2, 6, k, generator=g, dtype=torch.float64) for k in (3, 4, 4))
        ld = -torch.rand(1, 2, 6, generator=g, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (x, ld, B, C)]
        y = scan.ssd_scan(*leaves, backend="fused")
    (gx,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
    assert gx.requires_grad  # the error is delayed to the second backward pass
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ssd_half_precision_gradients_keep_their_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    x, B, C = (torch.randn(1, 2, 20, k, generator=g) for k in (3, 4, 4))
    ld = -torch.rand(1, 2, 20, generator=g)
    low = [t.to(dtype).requires_grad_() for t in (x, ld, B, C)]
    scan.ssd_scan(*low, backend="fused").float().square().sum().backward()
    ref = [t.detach().double().requires_grad_() for t in low]  # the same rounded inputs, in float64
    scan.ssd_scan(*ref, backend="reference").square().sum().backward()
    for lo, hi in zip(low, ref):
        assert lo.grad.dtype == dtype and rel(lo.grad.double(), hi.grad) <= 2e-2


def test_temp_fallback_cache_must_be_private(tmp_path):
    """The fallback folder in a shared temp dir is only used if it is ours and closed to others."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    assert fused._private_dir(mine)
    opened = tmp_path / "opened"
    opened.mkdir()
    opened.chmod(0o777)
    assert not fused._private_dir(opened)
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert not fused._private_dir(link)
    assert not fused._private_dir(tmp_path / "missing")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


PROBE = (
    "import torch\n"
    "from lambdaskip import scan\n"
    "from lambdaskip.scan import fused\n"
    "print(scan.resolve_backend('auto', 'cpu'))\n"
    "x = torch.randn(1, 2, 8)\n"
    "y = scan.selective_scan(x, torch.rand(1, 2, 8), -torch.rand(2, 3), torch.randn(1, 3, 8), torch.randn(1, 3, 8))\n"
    "try:\n"
    "    scan.selective_scan(x, torch.rand(1, 2, 8), -torch.rand(2, 3), torch.randn(1, 3, 8), torch.randn(1, 3, 8), backend='fused')\n"
    "    print('fused ran')\n"
    "except ValueError as e:\n"
    "    print('refused:', e)\n"
)


PORTABLE_CHECK = (
    "import torch\n"
    "from lambdaskip import scan\n"
    "from lambdaskip.scan import fused\n"
    "fused.load_library()\n"
    "assert '-march=native' not in fused.library_flags(), fused.library_flags()\n"
    "g = torch.Generator().manual_seed(0)\n"
    "x, B, C = torch.randn(2, 21, 150, generator=g), torch.randn(2, 16, 150, generator=g), torch.randn(2, 16, 150, generator=g)\n"
    "dt = 0.5 * torch.rand(2, 21, 150, generator=g)\n"
    "A, D, h0 = -torch.rand(21, 16, generator=g) * 4, torch.randn(21, generator=g), torch.randn(2, 21, 16, generator=g)\n"
    "worst = 0.0\n"
    "for dtype in (torch.float32, torch.float64):\n"
    "    grads = {}\n"
    "    for backend in ('fused', 'reference'):\n"
    "        prec = dtype if backend == 'fused' else torch.float64\n"
    "        leaves = [t.detach().to(prec).clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]\n"
    "        y, h = scan.selective_scan(*leaves[:6], backend=backend, initial_state=leaves[6], return_final_state=True)\n"
    "        (y.square().sum() + h.sum()).backward()\n"
    "        grads[backend] = [y.detach().double()] + [t.grad.double() for t in leaves]\n"
    "    for a, r in zip(grads['fused'], grads['reference']):\n"
    "        worst = max(worst, float((a - r).norm() / r.norm()) / (1e-4 if dtype == torch.float32 else 1e-10))\n"
    "print(worst)\n"
)


def test_portable_build_matches_the_reference(tmp_path):
    """The generic code paths (no AVX-512 intrinsics: vector extensions and scalar loops) are what a
    CPU without AVX-512 runs; on this machine they are only built with LAMBDASKIP_FUSED_NATIVE=0."""
    out = _python(PORTABLE_CHECK, LAMBDASKIP_FUSED_NATIVE="0", LAMBDASKIP_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split()[-1]) <= 1.0  # every output and gradient within its dtype's bar


def test_switched_off_falls_back_to_chunked():
    out = _python(PROBE, LAMBDASKIP_FUSED="0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "chunked"
    assert "backend='fused' cannot run here" in lines[1] and "LAMBDASKIP_FUSED=0" in lines[1]


def test_failed_build_falls_back_with_the_compiler_message(tmp_path):
    """A compiler that fails (here: `false`) in an empty cache: auto uses chunked, fused says why."""
    out = _python(PROBE, CXX="false", LAMBDASKIP_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "chunked"
    assert "refused:" in lines[1] and "failed" in lines[1]


def test_build_is_cached_per_source_and_cpu(tmp_path):
    """A fresh cache folder gets one library; a second process loads it without compiling."""
    code = "from lambdaskip.scan import fused; print(fused.load_library()._name)"
    first = _python(code, LAMBDASKIP_CACHE_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("scan_kernels_")  # no temporary files left behind
    mtime = (tmp_path / built[0]).stat().st_mtime_ns
    second = _python(code, LAMBDASKIP_CACHE_DIR=str(tmp_path))
    assert second.stdout == first.stdout and (tmp_path / built[0]).stat().st_mtime_ns == mtime


def test_wheel_ships_the_kernel_source(tmp_path):
    """`pip install` (e.g. on Colab) must carry the C++ source, or the fused backend silently
    falls back to the chunked one. Built from a copy of the package so the checkout stays clean."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "lambdaskip", src / "lambdaskip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next((tmp_path / "dist").glob("lambdaskip-*.whl"))
    assert "lambdaskip/scan/_fused_kernels.cpp" in zipfile.ZipFile(wheel).namelist()


def test_saved_tensor_hooks_that_misalign_are_harmless():
    """The float32 kernel reads the saved tile states as 64-byte vectors; a saved-tensors hook that hands
    them back off alignment (here: shifted by one float) must give the same gradients, bit for bit."""
    x, delta, A, B, C, _, _ = (t.float() if t is not None else None for t in s6(2, 20, 16, 130, h0=False))

    def unpack_misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)

    grads = []
    for hooked in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, delta, A, B, C)]
        if hooked:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack_misaligned):
                y = scan.selective_scan(*leaves, backend="fused")
        else:
            y = scan.selective_scan(*leaves, backend="fused")
        y.square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
