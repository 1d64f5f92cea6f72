"""The ``"fused"`` backend: a compiled CPU kernel that walks through time once, state in registers.

Why it exists: eager PyTorch cannot fuse the scan. Every state entry ``h_t[c, s]`` needs its own
decay ``exp(Δ_t[c] A[c, s])``, so a PyTorch backend writes (and reads back) arrays ``n`` times
larger than the input — the chunked backend runs 50–100× slower than copying the inputs once
(L = 4096–16384). The kernel in ``_fused_kernels.cpp`` (C++, no dependencies) forms the decays and
inputs in registers and reads every input once, which is what the memory-bound floor assumes.

How it is built: at first use, with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``)
and ``-O3 -march=native``, into a cache folder (``$LAMBDASKIP_CACHE_DIR``, else
``~/.cache/lambdaskip``) under a name that hashes the source, the flags, the compiler and the CPU,
so a stale or foreign binary is never loaded. It is loaded with :mod:`ctypes` (which releases the GIL during the call) and called
with raw pointers on contiguous tensors. Lanes (blocks of 16 channels of one batch element for
Mamba-1 in float32, ``batch × channels`` in float64, ``batch × heads`` for Mamba-2) are shared
out over ``torch.get_num_threads()`` threads with OpenMP — in a PyTorch process the library binds
to the OpenMP runtime PyTorch already loaded, so it runs on PyTorch's own worker threads.
Compiling takes a few seconds, once per machine.

Speed (measured by ``python -m lambdaskip.bench scan``): the float32 Mamba-1 kernel is bound by
arithmetic, not memory: every state entry costs one exponential (a degree-6 polynomial after range
reduction, ``exp2_nonpos_v`` in the source) and three multiply-adds, vectorised over 16 channels.

``LAMBDASKIP_FUSED_NATIVE=0`` builds portable code instead of code tuned for this CPU (the tests use
it to check the kernel's generic paths on machines with AVX-512).

Where it is not available (no compiler, a non-CPU tensor, ``LAMBDASKIP_FUSED=0``), ``backend="auto"``
uses the chunked backend instead and ``backend="fused"`` raises a ValueError saying why
(:func:`unavailable_reason`).

Gradients: Mamba-1 has a fused backward too: a reverse-time scan, vectorised over channels like the
forward, with the states recomputed tile by tile from the states entering every tile of 64 steps
(saved by the forward pass when an input requires grad; a quarter of ``x``'s size for n = 16), never
by dividing by a decay. Its sums over channels (dB, dC) are written without atomics, so a float32
backward gives the same bits on any number of threads (for batch ≥ threads). Mamba-2 has its own
fused backward, one lane per (batch, head) and vectorised over the head dimension, recomputing from
the same kind of tile states (``n / 64`` times the size of ``x``: a quarter for n = 16, twice it for
n = 128). Second derivatives are refused (``backend="chunked"`` has them).

Dtypes: float32 and float64 run natively; float16/bfloat16 are computed in float32 and cast back.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["is_available", "unavailable_reason", "load_library", "library_flags", "selective_scan_fused",
           "ssd_scan_fused", "MAX_STATE", "build_flags", "check_state_size"]

MAX_STATE = 256  # the kernel's largest state size n (kMaxN in the C++ source)
_SOURCE = Path(__file__).with_name("_fused_kernels.cpp")
_BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
_COMPILE_TIMEOUT_S = 300  # a compiler that hangs must not hang the caller
_lock = threading.Lock()
_state: dict = {"lib": None, "error": None, "tried": False, "flags": None}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """Machine + CPU feature flags: a binary built with -march=native must not run on another CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{flags}"


def build_flags(native: bool = True, openmp: bool = True) -> list[str]:
    """Compiler flags of the fused kernel (``native``: tune for this CPU with ``-march=native``;
    ``openmp``: share lanes over threads with OpenMP, the runtime PyTorch itself uses)."""
    flags = list(_BASE_FLAGS)
    if openmp:
        flags.append("-fopenmp")
    if native:
        flags.append("-march=native")
        if "avx512f" in _cpu_signature().split():
            flags.append("-mprefer-vector-width=512")  # n = 16 floats fill exactly one 512-bit register
    return flags


def _private_dir(path: Path) -> bool:
    """Whether ``path`` is a real folder (not a link) owned by this user and writable by nobody else:
    a shared folder such as /tmp must not let another user plant the library we are about to load."""
    import stat

    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o022:
        return False
    return not hasattr(os, "getuid") or info.st_uid == os.getuid()


def _cache_dir() -> Path:
    """Where compiled kernels live: ``$LAMBDASKIP_CACHE_DIR``, else ``~/.cache/lambdaskip``; if that
    cannot be written (a read-only home on some clusters), a private per-user folder in the temp dir.

    Raises:
        RuntimeError: no usable folder (the fused backend is then unavailable; the others still work).
    """
    root = os.environ.get("LAMBDASKIP_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "lambdaskip"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    fallback = Path(tempfile.gettempdir()) / f"lambdaskip-{user}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot write the kernel cache {path} nor create {fallback}: {exc}") from exc
    if not _private_dir(fallback):
        raise RuntimeError(f"cannot write the kernel cache {path}, and {fallback} is not a private folder "
                           "of this user (set LAMBDASKIP_CACHE_DIR to a folder you own)")
    return fallback


def _compile(cxx: str, flags: list[str]) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(_SOURCE.read_bytes())
    key.update("\n".join(["", " ".join(flags), version, _cpu_signature()]).encode())
    target = _cache_dir() / f"scan_kernels_{key.hexdigest()[:20]}{'.dll' if os.name == 'nt' else '.so'}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: parallel test workers may compile at the same time
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                              timeout=_COMPILE_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cxx).name} {' '.join(flags)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp creates 0600; a shared cache must stay loadable by its owner's tools
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64
    # (the float32 S6 entries take one pointer more than the float64 ones: the tile checkpoints)
    for name, pointers, ints in (("s6_forward_f32", 10, 5), ("s6_forward_f64", 9, 5), ("s6_backward_f32", 16, 6),
                                 ("s6_backward_f64", 14, 5), ("ssd_forward_f32", 8, 5), ("ssd_forward_f64", 8, 5),
                                 ("ssd_backward_f32", 12, 5), ("ssd_backward_f64", 12, 5)):
        fn = getattr(lib, f"ls_{name}")
        fn.argtypes = [P] * pointers + [I] * ints
        fn.restype = ctypes.c_int
    for name in ("ls_max_state", "ls_vector_width", "ls_has_openmp"):
        getattr(lib, name).restype = ctypes.c_int


def load_library():
    """Compile (once per machine) and load the kernel library; returns the :class:`ctypes.CDLL`.

    Raises:
        RuntimeError: disabled with ``LAMBDASKIP_FUSED=0``, no C++ compiler found, or the build failed
            (the message carries the compiler's error).
    """
    with _lock:
        if _state["lib"] is not None:
            return _state["lib"]
        if _state["tried"]:
            raise RuntimeError(_state["error"])
        _state["tried"] = True
        try:
            if os.environ.get("LAMBDASKIP_FUSED", "1") == "0":
                raise RuntimeError("the fused CPU kernel is switched off (LAMBDASKIP_FUSED=0)")
            cxx = _compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
            errors = []
            attempts = ((True, True), (True, False), (False, False))
            if os.environ.get("LAMBDASKIP_FUSED_NATIVE", "1") == "0":  # portable code, no -march=native
                attempts = ((False, True), (False, False))
            for native, openmp in attempts:
                try:  # fall back to a portable / single-threaded build if the compiler refuses a flag
                    flags = build_flags(native=native, openmp=openmp)
                    path = _compile(cxx, flags)
                    break
                except RuntimeError as exc:
                    errors.append(str(exc))
            else:
                raise RuntimeError("\n".join(errors))
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.ls_max_state() != MAX_STATE:
                raise RuntimeError(f"kernel library {path} is out of date (max state {lib.ls_max_state()})")
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, record why (unavailable_reason)
            _state["error"] = f"the fused CPU scan kernel is unavailable: {exc}"
            raise RuntimeError(_state["error"]) from exc
        _state["lib"], _state["flags"] = lib, flags
        return lib


def library_flags() -> list[str] | None:
    """The compiler flags of the loaded kernel library (None before it is loaded or if it failed)."""
    return None if _state["flags"] is None else list(_state["flags"])


def is_available() -> bool:
    """Whether the fused kernel can run here (compiles it on first call)."""
    try:
        load_library()
        return True
    except RuntimeError:
        return False


def unavailable_reason() -> str | None:
    """Why the fused kernel cannot run here, or None if it can."""
    return None if is_available() else _state["error"]


# ----------------------------------------------------------------------------- running the kernels
def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype).contiguous()


def _saved(ctx) -> list[torch.Tensor | None]:
    """The tensors saved for backward, contiguous and 64-byte aligned as the kernels need (they
    normally are already; a saved-tensor hook may hand back something else)."""
    out = []
    for t in ctx.saved_tensors:
        if t is not None:
            t = t.contiguous()
            if t.data_ptr() % 64:  # the float32 S6 kernel reads the tile states as 64-byte vectors
                t = t.clone()
        out.append(t)
    return out


def check_state_size(n: int) -> None:
    """Raise a ValueError if the Mamba-1 kernel cannot take state size ``n`` (it keeps the state in
    registers: ``n <= MAX_STATE``)."""
    if n > MAX_STATE:
        raise ValueError(f"A has state size n = {n}; backend='fused' supports n <= {MAX_STATE} "
                         "(use backend='chunked')")


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise ValueError(f"backend='fused' runs on CPU tensors only; got tensors on {x.device} "
                         "(use backend='auto', 'chunked' or 'triton')")


_W = 16  # channels per vector in the float32 kernels (W in the C++ source)
_TILE = 64  # time steps per tile (kTile): the float32 backward restarts from the state entering each tile


def _s6_forward(lib, x, dt, A, B, C, D, h0, keep_checkpoints=False):
    """Run the forward kernel on prepared (contiguous, float32/float64, CPU) tensors; y includes D x.

    Returns ``(y, hlast, ckpt)``: ``ckpt`` (float32 with ``keep_checkpoints`` only, else None) holds the
    states entering every tile of 64 steps, ``(b, ceil(c / 16), ceil(L / 64), n, 16)``, for the backward."""
    b, c, L = x.shape
    n = A.shape[1]
    y = torch.empty_like(x)
    hlast = torch.empty(b, c, n, dtype=x.dtype)
    ckpt = None
    if x.dtype == torch.float64:
        status = lib.ls_s6_forward_f64(*(_ptr(t) for t in (x, dt, A, B, C, D, h0, y, hlast)), b, c, L, n, _threads())
    else:
        if keep_checkpoints:
            ckpt = torch.empty(b, -(-c // _W), -(-L // _TILE), n, _W, dtype=torch.float32)
        status = lib.ls_s6_forward_f32(*(_ptr(t) for t in (x, dt, A, B, C, D, h0, y, hlast, ckpt)), b, c, L, n,
                                       _threads())
    if status != 0:  # callers check n first (check_state_size): this is a bug, not bad input
        raise RuntimeError(f"the fused S6 forward kernel refused its arguments (n = {n}, status {status})")
    return y, hlast, ckpt


class _FusedSelectiveScan(torch.autograd.Function):
    """Mamba-1 scan with the fused forward and backward kernels (inputs already prepared)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, differentiable):
        lib = load_library()
        cdt = _compute_dtype(x.dtype)
        xs, dts, As, Bs, Cs, Ds, h0s = (_prepare(t, cdt) for t in (x, dt, A, B, C, D, h0))
        # y includes D x; the tile checkpoints only when a backward pass can follow
        y, hlast, ckpt = _s6_forward(lib, xs, dts, As, Bs, Cs, Ds, h0s, keep_checkpoints=differentiable)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        ctx.save_for_backward(xs, dts, As, Bs, Cs, Ds, h0s, ckpt)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (x, dt, A, B, C, D, h0))
        return y.to(x.dtype), hlast.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's gradients are not themselves differentiable
    def backward(ctx, gy, ghlast):
        lib = load_library()
        xs, dts, As, Bs, Cs, Ds, h0s, ckpt = _saved(ctx)
        Bt = Bs.transpose(1, 2).contiguous()  # (b, L, n): one step's n numbers adjacent
        Ct = Cs.transpose(1, 2).contiguous()
        b, c, L = xs.shape
        n = As.shape[1]
        cdt = xs.dtype
        gy = None if gy is None else gy.detach().to(cdt).contiguous()
        ghl = None if ghlast is None else ghlast.detach().to(cdt).contiguous()
        dx, ddt = torch.empty_like(xs), torch.empty_like(xs)
        dh0 = torch.empty(b, c, n, dtype=cdt)
        threads = _threads()
        if cdt == torch.float32:
            if ckpt is None:  # the forward keeps them whenever an input requires grad
                raise RuntimeError("the fused forward pass kept no tile states for this backward pass")
            # dB, dC are sums over channels: one (L, n) row per group of channel blocks, groups = 1 unless
            # there are fewer batch elements than threads; every partial sum is written once (no
            # accumulation across threads), so the result does not depend on the thread count.
            # The skip term D x is differentiated in the kernel too (dx += D gy, dD = Σ gy x).
            groups = min(-(-c // _W), -(-threads // b))
            dAb = torch.empty(b, c, n, dtype=cdt)
            dBg, dCg = torch.empty(b, groups, L, n, dtype=cdt), torch.empty(b, groups, L, n, dtype=cdt)
            dDb = torch.empty(b, c, dtype=cdt) if Ds is not None and gy is not None else None
            status = lib.ls_s6_backward_f32(
                *(_ptr(t) for t in (xs, dts, As, Bt, Ct, Ds if gy is not None else None, gy, ghl, ckpt,
                                    dx, ddt, dh0, dAb, dBg, dCg, dDb)),
                b, c, L, n, groups, threads)
            dA, dB, dC = dAb.sum(0), dBg.sum(1).transpose(1, 2), dCg.sum(1).transpose(1, 2)
            dD = None if dDb is None else dDb.sum(0)
        else:
            # dA, dB, dC sum over lanes: one accumulator per thread, summed afterwards (no races)
            dA = torch.zeros(threads, c, n, dtype=cdt)
            dBt = torch.zeros(threads, b, L, n, dtype=cdt)
            dCt = torch.zeros(threads, b, L, n, dtype=cdt)
            status = lib.ls_s6_backward_f64(
                *(_ptr(t) for t in (xs, dts, As, Bt, Ct, h0s, gy, ghl, dx, ddt, dh0, dA, dBt, dCt)),
                b, c, L, n, threads)
            dA, dB, dC = dA.sum(0), dBt.sum(0).transpose(1, 2), dCt.sum(0).transpose(1, 2)
            dD = None
            if Ds is not None and gy is not None:  # y = scan + D x
                dx += Ds[:, None] * gy
                dD = (gy * xs).sum((0, 2))
        if status != 0:  # as in _s6_forward: n was checked before the forward pass
            raise RuntimeError(f"the fused S6 backward kernel refused its arguments (n = {n}, status {status})")
        out = [dx, ddt, dA, dB, dC, dD, dh0 if h0s is not None else None]
        return (*(None if g is None else g.to(dt) for g, dt in zip(out, ctx.dtypes)), None)


def selective_scan_fused(x, delta, A, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-1 layout with the fused CPU kernel (same contract as the reference).

    Shapes: ``x, delta: (batch, channels, L)``, ``A: (channels, n)`` with ``n ≤ 256``,
    ``B, C: (batch, n, L)``, ``D: (channels,)``, ``initial_state: (batch, channels, n)``.

    Internal: the kernel trusts its inputs (it reads raw memory), so this function does not check
    shapes or values. Call :func:`lambdaskip.scan.selective_scan` with ``backend="fused"``, which
    validates first, or :func:`lambdaskip.scan.check_selective_args` yourself.
    """
    _check_device(x)
    check_state_size(A.shape[1])
    inputs = (x, delta, A, B, C, D, initial_state)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, hlast = _FusedSelectiveScan.apply(*inputs, differentiable)
    return (y, hlast) if return_final_state else y


def _ssd_forward(lib, x, ld, B, C, h0, keep_checkpoints=False):
    """Run the SSD forward kernel on prepared tensors; returns ``(y, hlast, ckpt)`` where ``ckpt`` (with
    ``keep_checkpoints``) holds the state entering every tile of 64 steps, ``(b, H, ceil(L / 64), n, p)``."""
    b, H, L, p = x.shape
    n = B.shape[-1]
    y = torch.empty_like(x)
    hlast = torch.empty(b, H, n, p, dtype=x.dtype)
    ckpt = torch.empty(b, H, -(-L // _TILE), n, p, dtype=x.dtype) if keep_checkpoints else None
    kernel = lib.ls_ssd_forward_f64 if x.dtype == torch.float64 else lib.ls_ssd_forward_f32
    if kernel(*(_ptr(t) for t in (x, ld, B, C, h0, y, hlast, ckpt)), b * H, L, n, p, _threads()) != 0:
        raise RuntimeError(f"the fused SSD kernel refused shapes x {tuple(x.shape)}, B {tuple(B.shape)}")
    return y, hlast, ckpt


class _FusedSSD(torch.autograd.Function):
    """Mamba-2 scan with the fused forward and backward kernels (the forward keeps tile states)."""

    @staticmethod
    def forward(ctx, x, log_decay, B, C, h0, differentiable):
        lib = load_library()
        cdt = _compute_dtype(x.dtype)
        xs, lds, Bs, Cs, h0s = (_prepare(t, cdt) for t in (x, log_decay, B, C, h0))
        y, hlast, ckpt = _ssd_forward(lib, xs, lds, Bs, Cs, h0s, keep_checkpoints=differentiable)
        ctx.set_materialize_grads(False)
        ctx.has_h0 = h0 is not None
        ctx.dtypes = tuple(t.dtype for t in (x, log_decay, B, C)) + ((h0.dtype,) if h0 is not None else (None,))
        ctx.save_for_backward(xs, lds, Bs, Cs, ckpt)
        return y.to(x.dtype), hlast.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives: use backend="chunked"
    def backward(ctx, dy, dh):
        lib = load_library()
        xs, lds, Bs, Cs, ckpt = _saved(ctx)
        if ckpt is None:  # the forward keeps them whenever an input requires grad
            raise RuntimeError("the fused SSD forward pass kept no tile states for this backward pass")
        b, H, L, p = xs.shape
        n = Bs.shape[-1]
        cdt = xs.dtype
        # an output whose gradient is None contributes nothing: pass zeros (the kernel wants both)
        gy = torch.zeros_like(xs) if dy is None else dy.detach().to(cdt).contiguous()
        ghl = torch.zeros(b, H, n, p, dtype=cdt) if dh is None else dh.detach().to(cdt).contiguous()
        dx, dld = torch.empty_like(xs), torch.empty_like(lds)
        dB, dC = torch.empty_like(Bs), torch.empty_like(Cs)
        dh0 = torch.empty(b, H, n, p, dtype=cdt)
        kernel = lib.ls_ssd_backward_f64 if cdt == torch.float64 else lib.ls_ssd_backward_f32
        if kernel(*(_ptr(t) for t in (xs, lds, Bs, Cs, ckpt, gy, ghl, dx, dld, dB, dC, dh0)), b * H, L, n, p,
                  _threads()) != 0:
            raise RuntimeError("the fused SSD backward kernel refused its arguments")
        grads = [dx, dld, dB, dC, dh0 if ctx.has_h0 else None]
        return (*(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)), None)


def ssd_scan_fused(x, log_decay, B, C, D=None, initial_state=None, return_final_state=False):
    """Mamba-2 / SSD layout with the fused CPU kernel (same contract as the reference).

    Shapes: ``x: (batch, heads, L, p)``, ``log_decay: (batch, heads, L)``, ``B, C: (batch, heads, L, n)``,
    ``D: (heads,)``, ``initial_state: (batch, heads, n, p)``.

    Internal, like :func:`selective_scan_fused`: no input checks here; go through
    :func:`lambdaskip.scan.ssd_scan` (``backend="fused"``) or call ``check_ssd_args`` first.
    """
    _check_device(x)
    inputs = (x, log_decay, B, C, initial_state)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, hlast = _FusedSSD.apply(*inputs, differentiable)
    if D is not None:
        y = y + D[None, :, None, None] * x
    return (y, hlast) if return_final_state else y


if __name__ == "__main__":  # pragma: no cover - `python -m lambdaskip.scan.fused`: build and report
    try:
        lib = load_library()
        print("fused kernel:", lib._name)
        print(f"flags: {' '.join(library_flags())}; float vector width {lib.ls_vector_width()} floats; "
              f"OpenMP {'on' if lib.ls_has_openmp() else 'off'}")
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1)
