"""The selective-scan kernel: one entry point per layout, several interchangeable backends.

Glossary (code letter → meaning, Mamba papers' symbols):

* ``b`` batch, ``c`` channels (Mamba-1's ``D`` inner width), ``H`` heads (Mamba-2), ``p`` head
  dimension, ``n`` state size (``N``), ``L`` sequence length;
* ``delta`` = Δ (step size, already positive: the mixer applies softplus), ``A`` the diagonal
  state matrix (≤ 0), ``B``/``C`` the input/output projections (functions of the input, hence
  *selective*), ``D`` the skip ("feedthrough") term;
* ``Ā_t = exp(Δ_t A)`` (decay in (0, 1]), ``B̄_t = Δ_t B_t``.

Layouts and recurrences:

* **Mamba-1 / S6** — :func:`selective_scan`: ``x, delta: (b, c, L)``, ``A: (c, n)``,
  ``B, C: (b, n, L)``; ``h_t[c,s] = exp(Δ_t[c] A[c,s]) h_{t-1}[c,s] + Δ_t[c] B_t[s] x_t[c]``,
  ``y_t[c] = Σ_s C_t[s] h_t[c,s] + D[c] x_t[c]``.
* **Mamba-2 / SSD** — :func:`ssd_scan`: ``x: (b, H, L, p)``, ``log_decay: (b, H, L)``,
  ``B, C: (b, H, L, n)``; ``S_t = a_t S_{t-1} + B_t x_tᵀ``, ``y_t = S_tᵀ C_t + D x_t`` with
  ``a_t = exp(log_decay_t)``.

Both equal a product with a causal *mixing matrix* (theory reference §3):
:func:`selective_scan_matrix` and :func:`ssd_matrix` materialise it (``O(L²)``), the scans compute
the same ``M · V`` in ``O(L)`` without forming ``M``.

Backends (``backend=``): ``"reference"`` (sequential loop, the oracle), ``"chunked"`` (work-efficient
PyTorch, CPU and GPU), ``"parallel"`` (textbook log-depth Hillis–Steele scan, for comparison),
``"fused"`` (a compiled CPU kernel, built with the system C++ compiler at first use; see
:mod:`lambdaskip.scan.fused`), ``"triton"`` (CUDA; on CPU only under ``TRITON_INTERPRET=1``),
``"auto"`` (triton on CUDA when Triton is installed; on CPU fused when it compiles, chunked
otherwise). Every backend is differentiable with respect to every input.

Conventions chosen here: ``delta ≥ 0`` and ``A ≤ 0`` (resp. ``log_decay ≤ 0``) are *required*, so
every decay lies in (0, 1] and no backend can overflow; ``h_0 = 0`` unless ``initial_state`` is given.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ._validate import check_selective_args, check_ssd_args
from .chunked import linear_recurrence, segsum, selective_scan_chunked, ssd_scan_chunked
from .parallel import linear_recurrence_parallel, selective_scan_parallel, ssd_scan_parallel
from .reference import selective_scan_ref, ssd_scan_ref

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "ssd_scan",
    "selective_scan_matrix",
    "ssd_matrix",
    "segsum",
    "linear_recurrence",
    "linear_recurrence_parallel",
    "selective_scan_ref",
    "ssd_scan_ref",
]

BACKENDS = ("auto", "reference", "chunked", "parallel", "fused", "triton")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fused_available() -> bool:
    from . import fused  # cheap: compiles the kernel only on first call of is_available()

    return fused.is_available()


def _beyond_fused_state(state_size: int | None) -> bool:
    from .fused import MAX_STATE  # cheap: no compilation

    return state_size is not None and state_size > MAX_STATE


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backend names that can run on ``device`` in this environment (``"auto"`` excluded).

    On a CPU this compiles the fused kernel on first call (a few seconds, once per machine)."""
    device = torch.device(device)
    names = ["reference", "chunked", "parallel"]
    if device.type == "cpu" and _fused_available():
        names.append("fused")
    if _triton_installed() and ((device.type == "cuda" and torch.cuda.is_available()) or _triton_interpreted()):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device | str, state_size: int | None = None) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend name for tensors on ``device``.

    ``state_size``: the Mamba-1 state size n, if known. The fused kernel keeps the state in registers
    and supports ``n <= 256`` (:data:`lambdaskip.scan.fused.MAX_STATE`): beyond it ``"auto"`` picks
    ``"chunked"`` and ``"fused"`` is an error. (The Mamba-2 kernel has no such limit.)

    Raises:
        ValueError: unknown name, ``"triton"`` where it cannot run (no CUDA tensor / no Triton,
            and not ``TRITON_INTERPRET=1``), or ``"fused"`` where it cannot run (not a CPU tensor,
            no C++ compiler, switched off with ``LAMBDASKIP_FUSED=0``, or ``state_size`` above its limit).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" and _triton_installed() and not _triton_interpreted():
            return "triton"
        if device.type == "cpu" and _fused_available() and not _beyond_fused_state(state_size):
            return "fused"
        return "chunked"
    if backend == "fused" and _beyond_fused_state(state_size):
        from .fused import check_state_size

        check_state_size(state_size)  # raises, naming the limit
    if backend == "fused" and "fused" not in available_backends(device):
        from . import fused

        why = f"the tensors are on {device}, not the CPU" if device.type != "cpu" else fused.unavailable_reason()
        raise ValueError(f"backend='fused' cannot run here: {why} (use backend='chunked')")
    if backend == "triton" and "triton" not in available_backends(device):
        why = "Triton is not installed" if not _triton_installed() else f"the tensors are on {device}, not CUDA"
        raise ValueError(
            f"backend='triton' cannot run here: {why} (set TRITON_INTERPRET=1 to run the kernels "
            "interpreted on CPU, slowly; or use backend='chunked')"
        )
    return backend


def selective_scan(x, delta, A, B, C, D=None, *, backend: str = "auto", initial_state=None,
                   return_final_state: bool = False):
    """The Mamba-1 (S6) selective scan.

    ``h_t[c,s] = exp(Δ_t[c] A[c,s]) h_{t-1}[c,s] + Δ_t[c] B_t[s] x_t[c]``,
    ``y_t[c] = Σ_s C_t[s] h_t[c,s] + D[c] x_t[c]``, per batch element, with ``h_{-1} = initial_state`` (or 0).

    Args:
        x: ``(batch, channels, L)`` inputs, L ≥ 1.
        delta: ``(batch, channels, L)`` step sizes Δ ≥ 0 (already through softplus).
        A: ``(channels, n)`` diagonal state matrix, entries ≤ 0.
        B, C: ``(batch, n, L)`` input-dependent projections.
        D: ``(channels,)`` skip term, or None.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"parallel"``, ``"fused"`` or ``"triton"``.
        initial_state: ``(batch, channels, n)`` or None.
        return_final_state: also return ``h_{L-1}``.

    Returns:
        ``y`` of shape ``(batch, channels, L)``, or ``(y, h_last)`` with ``h_last: (batch, channels, n)``.

    Raises:
        TypeError / ValueError naming the argument: wrong types, dtypes, devices, shapes,
        non-finite values, ``delta < 0`` or ``A > 0``.
    """
    check_selective_args(x, delta, A, B, C, D, initial_state)
    name = resolve_backend(backend, x.device, state_size=A.shape[1])
    if name == "reference":
        fn = selective_scan_ref
    elif name == "chunked":
        fn = selective_scan_chunked
    elif name == "parallel":
        fn = selective_scan_parallel
    elif name == "fused":
        from .fused import selective_scan_fused as fn
    else:
        from .triton_backend import selective_scan_triton as fn  # lazy: imports triton
    return fn(x, delta, A, B, C, D, initial_state, bool(return_final_state))


def ssd_scan(x, log_decay, B, C, D=None, *, backend: str = "auto", initial_state=None,
             return_final_state: bool = False):
    """The Mamba-2 (SSD) scan: one scalar decay per head.

    ``S_t = exp(log_decay_t) S_{t-1} + B_t x_tᵀ`` (``S: (n, p)``), ``y_t = S_tᵀ C_t + D x_t``, i.e.
    ``y_t = Σ_{s≤t} (C_t·B_s) Π_{k=s+1..t} a_k x_s`` (+ the initial state's contribution).
    Scaling ``x`` or ``B`` by Δ is the caller's job.

    Args:
        x: ``(batch, heads, L, p)``.
        log_decay: ``(batch, heads, L)``, entries ≤ 0.
        B, C: ``(batch, heads, L, n)``.
        D: ``(heads,)`` or None.
        backend: as in :func:`selective_scan`.
        initial_state: ``(batch, heads, n, p)`` or None.
        return_final_state: also return ``S_{L-1}``.

    Returns:
        ``y`` of shape ``(batch, heads, L, p)``, or ``(y, S_last)`` with ``S_last: (batch, heads, n, p)``.
    """
    check_ssd_args(x, log_decay, B, C, D, initial_state)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        fn = ssd_scan_ref
    elif name == "chunked":
        fn = ssd_scan_chunked
    elif name == "parallel":
        fn = ssd_scan_parallel
    elif name == "fused":
        from .fused import ssd_scan_fused as fn
    else:
        from .triton_backend import ssd_scan_triton as fn  # lazy: imports triton
    return fn(x, log_decay, B, C, D, initial_state, bool(return_final_state))


def selective_scan_matrix(delta, A, B, C, D=None) -> torch.Tensor:
    """The Mamba-1 mixing matrices, one per channel: ``(batch, channels, L, L)``.

    ``M[b, c, i, j] = Σ_s C_i[s] exp(A[c,s] Σ_{k=j+1..i} Δ_k[c]) Δ_j[c] B_j[s]`` for ``j ≤ i``
    (+ ``D[c]`` on the diagonal), so ``selective_scan(x, ...)[b, c] == M[b, c] @ x[b, c]``.
    ``O(L²)`` memory: for checks and figures at small L.
    """
    dummy = torch.zeros_like(delta)
    check_selective_args(dummy, delta, A, B, C, D)
    seg = segsum(delta)  # (b, c, L, L): Σ_{j<k≤i} Δ_k, -inf above the diagonal
    n = A.shape[1]
    M = torch.zeros_like(seg)
    finite = torch.isfinite(seg)
    seg0 = seg.masked_fill(~finite, 0.0)
    for s in range(n):  # one state index at a time keeps memory at O(b c L²)
        decay = torch.exp(seg0 * A[None, :, s, None, None]).masked_fill(~finite, 0.0)
        M = M + decay * (C[:, None, s, :, None] * (delta * B[:, None, s, :])[:, :, None, :])
    if D is not None:
        M = M + torch.diag_embed(D[None, :, None].expand_as(delta))
    return M


def ssd_matrix(log_decay, B, C, D=None) -> torch.Tensor:
    """The Mamba-2 / SSD mixing matrices, one per head: ``(batch, heads, L, L)``.

    ``M = (C Bᵀ) ∘ exp(segsum(log_decay))`` (+ ``D`` on the diagonal), so
    ``ssd_scan(x, ...)[b, h] == M[b, h] @ x[b, h]``.
    """
    b, H, L, n = B.shape
    dummy = torch.zeros(b, H, L, 1, dtype=B.dtype, device=B.device)
    check_ssd_args(dummy, log_decay, B, C, D)
    M = torch.matmul(C, B.transpose(-1, -2)) * torch.exp(segsum(log_decay))
    if D is not None:
        M = M + torch.diag_embed(D[None, :, None].expand(b, H, L))
    return M
