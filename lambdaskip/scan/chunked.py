"""The chunked PyTorch backend (CPU and GPU): work-efficient, numerically stable, differentiable.

Two algorithms, one per layout.

**Mamba-1 (S6)**: the state ``h_t[c, s]`` has its own decay ``exp(Δ_t[c] A[c, s])`` for every
channel and state index, so the layer is ``batch·channels·n`` independent *scalar* linear
recurrences ``h_t = a_t h_{t-1} + u_t``. They are solved by :func:`linear_recurrence`, a two-level
scan: split time into ``K`` chunks of ``T`` steps; (1) run the recurrence inside every chunk at
once from a zero state (``T`` vectorised steps over all chunks); (2) carry the chunk-end states
across chunks (``K`` short steps, using each chunk's total decay); (3) add the carried state,
decayed to each position, back into the chunk (``T`` vectorised steps). That is ``O(L)`` work and
``T + K ≈ 2√L`` Python steps instead of ``L``. Only products of decays in ``(0, 1]`` ever appear,
so nothing can overflow; a product that underflows to 0 is the correct limit (the state has
been forgotten). Its backward pass is the same scan run backwards in time (see
:class:`_ChunkedRecurrence`), so gradients cost about as much as the forward.

**Mamba-2 (SSD)**: the decay is one scalar per head, so inside a chunk the recurrence is a masked
matrix product (the SSD algorithm of Dao & Gu, 2024): ``Y = (L ∘ C Bᵀ) X`` with the 1-semiseparable
mask ``L_ij = exp(Σ_{k=j+1..i} log a_k)``, computed from segment sums (:func:`segsum`: each entry
a sum of its own terms, the upper triangle set to ``-inf`` *before* the exponential, so every
exponent is ≤ 0); chunk-end states pass through :func:`linear_recurrence` across chunks.

When no gradient is needed (``torch.no_grad()`` or no input requiring grad), the Mamba-1 forward
takes a separate, faster arrangement of the same scan (:func:`_selective_forward_nograd`: lanes
ordered with channels innermost, inputs transposed once, buffers reused across segments).

Memory: the Mamba-1 path materialises ``(segment, batch, channels, n)`` tensors and, under
autograd, keeps the decays and states of every segment (about ``2 · L · batch · channels · n``
numbers) for the backward pass.
"""
from __future__ import annotations

import math

import torch

from ._validate import check_recurrence_args

__all__ = ["linear_recurrence", "chunked_recurrence", "selective_scan_chunked", "ssd_scan_chunked", "default_chunk", "segsum",
           "to_chunk_major", "from_chunk_major"]


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: ``(..., L)`` → ``(..., L, L)`` with ``out[i, j] = Σ_{k=j+1..i} log_a_k``
    for ``j ≤ i`` and ``-inf`` above the diagonal.

    Each entry is a sum of its own terms (a masked cumulative sum), not a difference of two long
    cumulative sums, so no precision is lost to cancellation; ``exp(segsum(log_a))`` is the
    1-semiseparable decay mask ``Π_{k=j+1..i} a_k`` with every exponent ≤ 0 when ``log_a ≤ 0``.
    """
    L = log_a.shape[-1]
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=log_a.device).tril(-1)
    terms = log_a[..., :, None].expand(*log_a.shape, L).masked_fill(~strictly_lower, 0.0)
    out = torch.cumsum(terms, dim=-2)  # out[i, j] = Σ_{j < k ≤ i} log_a_k
    lower = torch.ones(L, L, dtype=torch.bool, device=log_a.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def default_chunk(L: int) -> int:
    """Chunk length for :func:`linear_recurrence`: about √L (balances the ``T`` in-chunk steps
    against the ``K = L/T`` carry steps), at least 1."""
    return max(1, int(math.sqrt(L)))


# --------------------------------------------------------------------------------------------
# the scalar linear recurrence h_t = a_t h_{t-1} + u_t, many independent lanes at once
# --------------------------------------------------------------------------------------------
#
# Layout: "chunk-major" (T, K, M): entry [tau, k, m] is time t = k*T + tau of lane m. Every
# vectorised step below then reads and writes one contiguous (K, M) block, so no strided
# copies are needed (a time-major (K, T, M) layout made PyTorch copy every step's output).


@torch.no_grad()
def _scan_forward(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + u_t`` with ``h_{-1} = h0`` (zeros when None), chunk-major layout.

    ``a, u``: ``(T, K, M)`` contiguous, ``h0``: ``(M,)``. Returns ``h (T, K, M)``.
    """
    T, K, M = u.shape
    h = torch.empty_like(u)
    # (1) every chunk from a zero state, all K chunks at once: T-1 vectorised steps
    h[0] = u[0]
    for tau in range(1, T):
        torch.addcmul(u[tau], a[tau], h[tau - 1], out=h[tau])
    first = 0 if h0 is not None else 1  # chunks that receive a non-zero incoming state
    if K > first:
        # (2) the state entering every chunk: K-1 steps with each chunk's total decay P_k, a
        # product of numbers in (0, 1] (cannot overflow; an underflow to 0 means "forgotten")
        P = a.prod(dim=0)  # (K, M)
        cin = torch.empty(K, M, dtype=u.dtype, device=u.device)
        if h0 is None:
            cin[0].zero_()
        else:
            cin[0] = h0
        for k in range(1, K):
            torch.addcmul(h[T - 1, k - 1], P[k - 1], cin[k - 1], out=cin[k])
        # (3) add the incoming state, decayed to each position of its chunk: T vectorised steps
        carry = cin[first:]
        for tau in range(T):
            carry.mul_(a[tau, first:])
            h[tau, first:] += carry
    return h


@torch.no_grad()
def _scan_backward(a_next: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """The time-reversed recurrence ``g_t = a_next_t g_{t+1} + dh_t``, ``g_L = 0``, chunk-major."""
    T, K, M = dh.shape
    g = torch.empty_like(dh)
    g[T - 1] = dh[T - 1]
    for tau in range(T - 2, -1, -1):
        torch.addcmul(dh[tau], a_next[tau], g[tau + 1], out=g[tau])
    if K > 1:
        P = a_next.prod(dim=0)
        cin = torch.empty(K, M, dtype=dh.dtype, device=dh.device)
        cin[K - 1].zero_()
        for k in range(K - 2, -1, -1):
            torch.addcmul(g[0, k + 1], P[k + 1], cin[k + 1], out=cin[k])
        carry = cin[: K - 1]
        for tau in range(T - 1, -1, -1):
            carry.mul_(a_next[tau, : K - 1])
            g[tau, : K - 1] += carry
    return g


class _ChunkedRecurrence(torch.autograd.Function):
    """Autograd for ``h = scan(a, u, h0)`` in the chunk-major layout.

    With ``g_t = ∂ℓ/∂u_t`` (the adjoint state), the chain rule gives the reversed recurrence
    ``g_t = ∂ℓ/∂h_t + a_{t+1} g_{t+1}``, and then ``∂ℓ/∂a_t = g_t h_{t-1}``, ``∂ℓ/∂h0 = a_0 g_0``.
    """

    @staticmethod
    def forward(ctx, a, u, h0):
        h = _scan_forward(a, u, h0)
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(a, h, h0 if h0 is not None else torch.empty(0))
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        T, K, M = a.shape
        dh = dh.contiguous()
        # a_{t+1} in chunk-major order: the next row, or the first row of the next chunk
        a_next = torch.empty_like(a)
        a_next[:-1] = a[1:]
        a_next[-1, :-1] = a[0, 1:]
        a_next[-1, -1].zero_()  # multiplies g_L = 0
        g = _scan_backward(a_next, dh)
        da = dh0 = None
        if ctx.needs_input_grad[0]:
            da = torch.empty_like(a)  # g_t h_{t-1}
            torch.mul(g[1:], h[:-1], out=da[1:])
            torch.mul(g[0, 1:], h[-1, :-1], out=da[0, 1:])
            if ctx.has_h0:
                torch.mul(g[0, 0], h0, out=da[0, 0])
            else:
                da[0, 0].zero_()
        if ctx.has_h0 and ctx.needs_input_grad[2]:
            dh0 = a[0, 0] * g[0, 0]
        return da, g, dh0


def chunked_recurrence(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_recurrence` for inputs already in the chunk-major layout ``(T, K, *S)``
    (entry ``[tau, k]`` is time ``k*T + tau``); returns ``h`` in the same layout."""
    T, K = u.shape[:2]
    S = u.shape[2:]
    h = _ChunkedRecurrence.apply(a.reshape(T, K, -1).contiguous(), u.reshape(T, K, -1).contiguous(),
                                 None if h0 is None else h0.reshape(-1).contiguous())
    return h.view(T, K, *S)


def to_chunk_major(t: torch.Tensor, T: int, pad_value: float) -> torch.Tensor:
    """``(L, *S)`` → ``(T, K, *S)`` with ``K = ⌈L/T⌉``, padding the end of time with ``pad_value``."""
    L = t.shape[0]
    K = -(-L // T)
    if K * T != L:
        t = torch.cat([t, t.new_full((K * T - L, *t.shape[1:]), pad_value)], 0)
    return t.reshape(K, T, *t.shape[1:]).transpose(0, 1)


def from_chunk_major(t: torch.Tensor, L: int) -> torch.Tensor:
    """Inverse of :func:`to_chunk_major`: ``(T, K, *S)`` → ``(L, *S)``."""
    T, K = t.shape[:2]
    return t.transpose(0, 1).reshape(K * T, *t.shape[2:])[:L]


def linear_recurrence(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None = None, chunk: int | None = None):
    """Solve ``h_t = a_t ⊙ h_{t-1} + u_t`` (t = 0..L-1, ``h_{-1} = h0`` or 0) along dimension 0.

    Args:
        a: decays ``(L, *S)``, expected in [0, 1] (other values work, but only [0, 1] is
            guaranteed free of overflow).
        u: inputs ``(L, *S)``.
        h0: initial state ``(*S)`` or None.
        chunk: chunk length ``T`` (default ≈ √L).

    Returns:
        h: ``(L, *S)``, differentiable with respect to ``a``, ``u`` and ``h0``.

    Raises:
        TypeError / ValueError: non-float tensors, ``a`` and ``u`` of different shapes, ``L = 0``,
            ``h0`` not of shape ``(*S)``, or ``chunk`` not a positive int.
    """
    L = check_recurrence_args(a, u, h0, chunk)
    T = default_chunk(L) if chunk is None else min(chunk, L)
    # padding steps (decay 1, input 0) after the end leave every earlier state unchanged
    h = chunked_recurrence(to_chunk_major(a, T, 1.0), to_chunk_major(u, T, 0.0), h0)
    return from_chunk_major(h, L)


# --------------------------------------------------------------------------------------------
# Mamba-1 layout
# --------------------------------------------------------------------------------------------

# how many state elements (time × batch × channels × n) one segment may hold: bounds the memory
# of the (L, b, c, n) intermediates; measured on a 2-core CPU
_SEGMENT_ELEMENTS = 1 << 20


def selective_scan_chunked(x, delta, A, B, C, D=None, initial_state=None, return_final_state=False,
                           chunk: int | None = None, segment: int | None = None):
    """Mamba-1 layout (same contract as :func:`~lambdaskip.scan.reference.selective_scan_ref`).

    Time is cut into segments of ``segment`` steps (default: as many as fit ``2²⁰`` state
    elements); in each, the decays ``exp(Δ A)`` and inputs ``Δ x B`` are formed directly in the
    chunk-major ``(T, K, batch, channels, n)`` layout (only the small per-token tensors are
    rearranged) and solved by the chunked recurrence; ``y = Σ_s C h`` is a batched mat-vec.
    """
    b, c, L = x.shape
    n = A.shape[1]
    per_step = b * c * n
    S = segment if segment is not None else max(16, _SEGMENT_ELEMENTS // per_step)
    S = max(1, min(int(S), L))
    tensors = (x, delta, A, B, C, D, initial_state)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return _selective_forward_nograd(x, delta, A, B, C, D, initial_state, return_final_state, chunk, segment)
    dt = delta.permute(2, 0, 1)  # (L, b, c): time first
    ux = (delta * x).permute(2, 0, 1)
    Bt = B.permute(2, 0, 1)  # (L, b, n)
    Ct = C.permute(2, 0, 1)
    h = initial_state
    ys = []
    for start in range(0, L, S):
        stop = min(L, start + S)
        Ls = stop - start
        T = default_chunk(Ls) if chunk is None else max(1, min(int(chunk), Ls))
        # pad with Δ = 0 (decay 1, input 0): the state passes through padding unchanged
        # (contiguous copies of these small tensors, so that the large ones built from them
        # come out contiguous in chunk-major order instead of inheriting a permuted layout)
        dt_c = to_chunk_major(dt[start:stop], T, 0.0).contiguous()  # (T, K, b, c)
        ux_c = to_chunk_major(ux[start:stop], T, 0.0).contiguous()
        B_c = to_chunk_major(Bt[start:stop], T, 0.0).contiguous()  # (T, K, b, n)
        C_c = to_chunk_major(Ct[start:stop], T, 0.0).contiguous()
        a = (dt_c[..., None] * A).exp_()  # (T, K, b, c, n), entries in (0, 1]; in place saves a buffer
        u = ux_c[..., None] * B_c[..., None, :]  # (T, K, b, c, n)
        hs = chunked_recurrence(a, u, h)
        y_c = torch.matmul(hs, C_c[..., None]).squeeze(-1)  # (T, K, b, c) = Σ_s C_t[s] h_t[c, s]
        ys.append(from_chunk_major(y_c, Ls))
        h = hs[-1, -1]  # the last padded step: equal to the state at the last real step
    y = (ys[0] if len(ys) == 1 else torch.cat(ys, 0)).permute(1, 2, 0)
    if D is not None:
        y = y + D[:, None] * x
    return (y, h) if return_final_state else y


def _to_time_major(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``(b, c, L)`` → a contiguous ``(b, L + extra, c)`` copy whose last ``extra`` steps are 0
    (padding), one 2-D transpose per batch element (PyTorch's cache-blocked transpose kernel)."""
    b, c, L = t.shape
    out = torch.empty(b, L + extra, c, dtype=t.dtype, device=t.device)
    out[:, L:].zero_()
    for i in range(b):
        out[i, :L].copy_(t[i].t())
    return out


def _chunk_view(t: torch.Tensor, start: int, T: int, K: int) -> torch.Tensor:
    """Chunk-major view ``(T, K, b, c)`` of steps ``start .. start + T·K`` of a ``(b, L', c)`` buffer."""
    b, _, c = t.shape
    return t[:, start:start + T * K].view(b, K, T, c).permute(2, 1, 0, 3)


@torch.no_grad()
def _scan_forward_into(a: torch.Tensor, u: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """No-grad variant of :func:`_scan_forward` (same recurrence, chunk-major ``(T, K, M)``) that
    overwrites ``u`` with ``h`` and feeds ``h0`` into the first step of chunk 0 directly, so that
    with ``K = 1`` it is a plain sequential loop without the carry passes."""
    T, K, M = u.shape
    h = u
    rows_a, rows_h = a.unbind(0), h.unbind(0)
    if h0 is not None:
        h[0, 0].addcmul_(a[0, 0], h0)
    prev = rows_h[0]
    for tau in range(1, T):
        cur = rows_h[tau]
        cur.addcmul_(rows_a[tau], prev)
        prev = cur
    if K > 1:
        # the state entering chunks 1..K-1: K-1 steps with each chunk's total decay (in (0, 1])
        P = a[:, :-1].prod(dim=0)  # (K-1, M)
        cin = torch.empty(K - 1, M, dtype=u.dtype, device=u.device)
        cin[0] = h[T - 1, 0]
        for k in range(1, K - 1):
            torch.addcmul(h[T - 1, k], P[k], cin[k - 1], out=cin[k])
        # add it, decayed to each position, into chunks 1..K-1
        carry = cin
        for tau in range(T):
            carry.mul_(rows_a[tau][1:])
            rows_h[tau][1:] += carry
    return h


# segment size of the no-grad forward (state elements): bounds its two reusable buffers to a few
# MB, L3-resident (measured on a shared 2-core EPYC, one thread: 2^20 at least as fast as 2^16-2^19)
_NOGRAD_SEGMENT_ELEMENTS = 1 << 20
# lanes per vectorised step (K chunks × b·n·c lanes): wide enough to hide the per-call overhead
_NOGRAD_STEP_WIDTH = 1 << 16


@torch.no_grad()
def _selective_forward_nograd(x, delta, A, B, C, D, initial_state, return_final_state, chunk, segment):
    """The forward pass of :func:`selective_scan_chunked` when no gradient is needed: the same
    two-level scan per segment, arranged for speed on CPU (same arithmetic per state element, so
    the same accuracy; about 1.5-2.5× faster than the autograd path, see ``lambdaskip.bench``).

    * lanes are ordered ``(batch, n, channels)``, channels innermost: every broadcast product
      (``Δ A``, ``Δx ⊗ B``, ``C ⊙ h``) then streams along a contiguous axis, and ``y = Σ_s C h``
      is a sum over a *middle* axis (adding rows of ``c`` numbers) instead of a batched mat-vec
      with 16-long rows (measured ~2× slower);
    * the per-token inputs are transposed once to ``(b, L, ·)`` buffers (gathering straight from
      ``(b, c, L)`` memory touches a different page per element: measured ~5× slower), and every
      segment reads and writes them through chunk-major views;
    * the large ``(T, K, b, n, c)`` buffers are allocated once and reused by every segment (a
      fresh multi-MB allocation per segment costs page faults on first touch);
    * each segment runs ``K`` chunks side by side (:func:`_scan_forward_into`), ``K`` chosen so a
      vectorised step spans about ``_NOGRAD_STEP_WIDTH`` lanes.
    """
    b, c, L = x.shape
    n = A.shape[1]
    dtype, device = x.dtype, x.device
    if segment is None:
        segment = max(16, _NOGRAD_SEGMENT_ELEMENTS // (b * c * n))
    S = max(1, min(int(segment), L))
    AT = A.t().contiguous()  # (n, c)
    # (b, L + S, ·) buffers; the S steps at the end pad the last segment to T·K steps (zeros,
    # though any finite values would do: padding comes after the last real step of a segment)
    dt_b = _to_time_major(delta, S)
    x_b = _to_time_major(x, S)
    B_b = _to_time_major(B, S)  # (b, L + S, n)
    C_b = _to_time_major(C, S)
    y_b = torch.empty(b, L + S, c, dtype=dtype, device=device)
    size = 2 * S * b * n * c  # T·K < Ls + T ≤ 2 S
    a_buf = torch.empty(size, dtype=dtype, device=device)
    u_buf = torch.empty_like(a_buf)
    h = None if initial_state is None else initial_state.transpose(-1, -2).reshape(-1).contiguous()  # (b n c)
    for start in range(0, L, S):
        Ls = min(L, start + S) - start
        if chunk is None:
            # K chunks side by side make each step about _NOGRAD_STEP_WIDTH lanes wide; with few
            # lanes, K ≈ √(2 Ls) minimises the 2·Ls/K + K Python-level steps instead
            K = max(1, min(Ls, _NOGRAD_STEP_WIDTH // (b * n * c), math.isqrt(2 * Ls) + 1))
            T = -(-Ls // K)
        else:
            T = max(1, min(int(chunk), Ls))
        K = -(-Ls // T)
        dt_c = _chunk_view(dt_b, start, T, K)  # (T, K, b, c)
        x_c = _chunk_view(x_b, start, T, K)
        B_c = _chunk_view(B_b, start, T, K)  # (T, K, b, n)
        C_c = _chunk_view(C_b, start, T, K)
        # small contiguous copies (inner rows of c numbers, cheap), so the big products stream
        dt_c, x_c, B_c, C_c = dt_c.contiguous(), x_c.contiguous(), B_c.contiguous(), C_c.contiguous()
        a = a_buf[: T * K * b * n * c].view(T, K, b, n, c)
        u = u_buf[: T * K * b * n * c].view(T, K, b, n, c)
        torch.mul(dt_c[:, :, :, None, :], AT, out=a)
        a.exp_()  # decays in (0, 1]
        ux_c = dt_c * x_c  # (T, K, b, c)
        torch.mul(ux_c[:, :, :, None, :], B_c[..., None], out=u)
        hs = _scan_forward_into(a.view(T, K, -1), u.view(T, K, -1), h).view(T, K, b, n, c)
        # the state at the segment's last real step (the padding steps past it may hold the next
        # segment's inputs: the views overlap it, harmlessly, as time is causal and y is rewritten)
        h = hs[(Ls - 1) % T, (Ls - 1) // T].reshape(-1).clone()
        # y = Σ_s C_t[s] h_t[s, :]; the product reuses the decay buffer, no longer needed
        y_c = _chunk_view(y_b, start, T, K)
        y_seg = torch.mul(hs, C_c[..., None], out=a).sum(dim=3)  # (T, K, b, c)
        if D is not None:
            y_seg.addcmul_(x_c, D)
        y_c.copy_(y_seg)
    y = torch.empty(b, c, L, dtype=dtype, device=device)
    for i in range(b):
        y[i].copy_(y_b[i, :L].t())
    if return_final_state:
        return y, h.view(b, n, c).transpose(-1, -2).contiguous()
    return y


# --------------------------------------------------------------------------------------------
# Mamba-2 / SSD layout
# --------------------------------------------------------------------------------------------

SSD_CHUNK = 64


def ssd_scan_chunked(x, log_decay, B, C, D=None, initial_state=None, return_final_state=False,
                     chunk: int | None = None):
    """Mamba-2 / SSD layout (same contract as :func:`~lambdaskip.scan.reference.ssd_scan_ref`).

    Per chunk of ``T`` steps (shapes per batch and head): ``G = C Bᵀ`` ``(T, T)``, the decay mask
    ``Lm_ij = exp(cs_i - cs_j)`` for ``j ≤ i`` (``cs`` = chunk-local cumulative log-decay), the
    intra-chunk output ``(G ∘ Lm) X``, the chunk's own end state ``Σ_j exp(cs_T - cs_j) B_j x_jᵀ``,
    the states entering every chunk via :func:`linear_recurrence` over chunks, and their
    contribution ``exp(cs_i) C_i · state``.
    """
    b, H, L, p = x.shape
    n = B.shape[-1]
    T = SSD_CHUNK if chunk is None else int(chunk)
    T = max(1, min(T, L))
    K = -(-L // T)
    pad = K * T - L
    if pad:  # trailing steps with decay 1 and zero input leave the state and earlier outputs unchanged
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        B = torch.nn.functional.pad(B, (0, 0, 0, pad))
        C = torch.nn.functional.pad(C, (0, 0, 0, pad))
        ld = torch.nn.functional.pad(log_decay, (0, pad))
    else:
        ld = log_decay
    xc = x.reshape(b, H, K, T, p)
    Bc = B.reshape(b, H, K, T, n)
    Cc = C.reshape(b, H, K, T, n)
    ldc = ld.reshape(b, H, K, T)
    cs = torch.cumsum(ldc, dim=-1)  # (b, H, K, T): log of the decay from the chunk start, ≤ 0
    # decay mask from segment sums (sums of their own terms, exact zeros on the diagonal) rather
    # than differences cs_i - cs_j: a difference of two long sums loses digits, and its gradient
    # would cancel two O(1) terms where the true derivative is tiny (decays near 0)
    seg = segsum(ldc)  # (b, H, K, T, T), -inf above the diagonal
    Lm = torch.exp(seg)
    G = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, H, K, T, T)
    y = torch.matmul(G * Lm, xc)  # (b, H, K, T, p)
    decay_to_end = Lm[..., -1, :]  # (b, H, K, T): Π_{k=j+1..T-1} a_k, in (0, 1]
    states = torch.matmul((Bc * decay_to_end[..., None]).transpose(-1, -2), xc)  # (b, H, K, n, p)
    chunk_decay = torch.exp(cs[..., -1])  # (b, H, K)
    # states after every chunk: a K-step scalar recurrence per (b, H, n, p) lane
    a_k = chunk_decay.permute(2, 0, 1)[..., None, None].expand(K, b, H, n, p)
    ends = linear_recurrence(a_k, states.permute(2, 0, 1, 3, 4), initial_state)  # (K, b, H, n, p)
    if K > 1 or initial_state is not None:
        first = initial_state if initial_state is not None else x.new_zeros(b, H, n, p)
        incoming = torch.cat([first[None], ends[:-1]], 0).permute(1, 2, 0, 3, 4)  # (b, H, K, n, p)
        y = y + torch.matmul(Cc * torch.exp(cs)[..., None], incoming)
    y = y.reshape(b, H, K * T, p)[:, :, :L]
    if D is not None:
        y = y + D[None, :, None, None] * x[:, :, :L]
    return (y, ends[-1]) if return_final_state else y
