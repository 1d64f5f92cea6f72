"""Benchmarks: ``python -m lambdaskip.bench scan`` times every scan backend in one run.

For each channel count and sequence length (batch 4, n = 16, float32 by default) it measures the
median wall-clock time of several repetitions of

* the forward pass (under ``torch.no_grad``) and the forward + backward pass (gradients to every
  input) of each backend: the sequential ``reference`` loop, the ``chunked`` PyTorch backend, the
  textbook log-depth ``parallel`` scan (Hillis–Steele, written for comparison), the compiled CPU
  kernel ``fused`` when it builds, and ``triton`` on CUDA when Triton is installed;
* the **memory-bound floor**: the time to copy the same input tensors (``x, Δ, B, C``) once, in the
  same process, right before — no scan can finish faster than it reads its inputs.

``--layout s6`` (default) times the Mamba-1 scan (:func:`lambdaskip.scan.selective_scan`);
``--layout ssd`` the Mamba-2 scan (:func:`lambdaskip.scan.ssd_scan`) with the same number of channels
split into heads of ``--headdim`` (x: ``(batch, channels / headdim, L, headdim)``, one decay per head
and step, B and C per head), written to ``bench_ssd_<device>.csv``.

It prints speed-ups against the reference loop and against the textbook scan, the achieved memory
bandwidth (bytes of inputs read + output written, per second) and the ratio to the floor, and
writes the table with its provenance to ``data/results/bench_scan_<device>.csv`` / ``.json``.

Timings on a shared machine are noisy: the table reports medians, how many repetitions each cell
got (cells stop repeating after ``--budget`` seconds), the thread count and the load average.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["scan_benchmark", "time_call", "main"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, reps: int = 5, budget_s: float = 20.0, warmup: int = 1) -> tuple[float, int]:
    """Median wall-clock seconds of ``fn()`` over up to ``reps`` runs (after ``warmup`` runs),
    stopping early once ``budget_s`` seconds have been spent. Returns ``(median, runs)``."""
    device = torch.device(device)
    spent = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        spent += time.perf_counter() - t0
        if spent > budget_s:  # a single run already took the whole budget: report it
            return spent / max(1, warmup), 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > budget_s:
            break
    return statistics.median(times), len(times)


def _ssd_inputs(b, c, n, L, headdim, dtype, device, seed=0):
    """Mamba-2 inputs with ``c`` channels in heads of ``headdim``: ``x, log_decay, B, C, D``."""
    if c % headdim:
        raise ValueError(f"channels ({c}) must be a multiple of headdim ({headdim}) for layout='ssd'")
    H = c // headdim
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, H, L, headdim, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, H, L, generator=g, dtype=dtype) - 4)  # Mamba-like Δ
    log_decay = -dt * torch.arange(1, H + 1, dtype=dtype)[None, :, None]  # Δ A with A = −1..−H
    B = torch.randn(b, H, L, n, generator=g, dtype=dtype)
    C = torch.randn(b, H, L, n, generator=g, dtype=dtype)
    D = torch.ones(H, dtype=dtype)
    return [t.to(device) for t in (x, log_decay, B, C, D)]


def _inputs(b, c, n, L, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, L, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(b, c, L, generator=g, dtype=dtype) - 4)  # Mamba-like Δ
    A = -torch.arange(1, n + 1, dtype=dtype).repeat(c, 1)  # S4D-real initialisation, −1..−n
    B = torch.randn(b, n, L, generator=g, dtype=dtype)
    C = torch.randn(b, n, L, generator=g, dtype=dtype)
    D = torch.ones(c, dtype=dtype)
    return [t.to(device) for t in (x, delta, A, B, C, D)]


def _memory_estimate(backend: str, b, c, n, L, itemsize: int, backward: bool) -> float:
    """Rough peak bytes of one call, used only to skip configurations that would not fit."""
    state = b * c * n * L * itemsize  # one (L, b, c, n) tensor
    if backend == "reference":
        return (4 if backward else 0.2) * state
    if backend == "parallel":
        return (2.5 * math.ceil(math.log2(max(L, 2))) if backward else 4) * state
    if backend == "chunked":
        return (5 if backward else 0.5) * state
    if backend == "fused":
        return 0.3 * state  # inputs, outputs and one (b, L, n) gradient buffer per thread
    return 0.2 * state  # triton: only inputs/outputs (+ the chunked backward)


def scan_benchmark(channels=(64, 256), lengths=(256, 1024, 4096, 16384), backends=None, *, batch=4, n=16,
                   dtype=torch.float32, device="cpu", reps=5, budget_s=20.0, max_memory_gb=3.0,
                   backward=True, threads=None, verbose=True, layout="s6", headdim=64):
    """Time the scan backends; returns a list of dict rows (one per backend × size × pass).

    ``layout``: ``"s6"`` (Mamba-1, :func:`lambdaskip.scan.selective_scan`) or ``"ssd"`` (Mamba-2,
    :func:`lambdaskip.scan.ssd_scan`, ``channels`` split into heads of ``headdim``).

    ``threads``: run with this many intra-op CPU threads (restored afterwards; the copy floor, the
    PyTorch backends and the fused kernel all use them); ``None`` keeps the current setting. One
    thread is the robust choice on a machine shared with other work, where a descheduled OpenMP
    thread stalls every parallel operation.

    Each row: ``backend, pass ("fwd" | "fwd+bwd" | "copy"), channels, L, seconds, runs, gbps``
    (input + output bytes / seconds), and ``skipped`` (a reason, or "").
    """
    if layout not in ("s6", "ssd"):
        raise ValueError(f"layout must be 's6' or 'ssd', got {layout!r}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _scan_benchmark(channels, lengths, backends, batch, n, dtype, device, reps, budget_s, max_memory_gb,
                               backward, verbose, layout, headdim)
    finally:
        torch.set_num_threads(old_threads)


def _scan_benchmark(channels, lengths, backends, batch, n, dtype, device, reps, budget_s, max_memory_gb, backward,
                    verbose, layout, headdim):
    from . import scan

    device = torch.device(device)
    if backends is None:  # (Triton interpreted on a CPU would take hours: only on a GPU)
        backends = [name for name in ("reference", "chunked", "parallel", "fused", "triton")
                    if name in scan.available_backends(device) and (name != "triton" or device.type == "cuda")]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for c in channels:
        for L in lengths:
            if layout == "s6":
                args = _inputs(batch, c, n, L, dtype, device)  # x, delta, A, B, C, D
                streamed, run = [args[i] for i in (0, 1, 3, 4)], scan.selective_scan
            else:
                args = _ssd_inputs(batch, c, n, L, headdim, dtype, device)  # x, log_decay, B, C, D
                streamed, run = args[:4], scan.ssd_scan
            x = args[0]
            io_bytes = (sum(t.numel() for t in streamed) + x.numel()) * itemsize  # read the inputs, write y
            bufs = [torch.empty_like(t) for t in streamed]

            def copy():
                for dst, src in zip(bufs, streamed):
                    dst.copy_(src)

            t_copy, runs = time_call(copy, device, reps=max(reps, 5), budget_s=budget_s)
            copy_bytes = 2 * sum(t.numel() for t in bufs) * itemsize
            rows.append(dict(backend="copy", **{"pass": "copy"}, channels=c, L=L, seconds=t_copy, runs=runs,
                             gbps=copy_bytes / t_copy / 1e9, skipped=""))
            if verbose:
                print(f"c={c:4d} L={L:6d}  copy floor {t_copy * 1e3:9.2f} ms ({copy_bytes / t_copy / 1e9:.1f} GB/s)", flush=True)
            for name in backends:
                for passes in (("fwd", "fwd+bwd") if backward else ("fwd",)):
                    need = _memory_estimate(name, batch, c, n, L, itemsize, passes != "fwd") / 1e9
                    row = dict(backend=name, **{"pass": passes}, channels=c, L=L, seconds=float("nan"), runs=0,
                               gbps=float("nan"), skipped="")
                    if need > max_memory_gb:
                        row["skipped"] = f"needs ~{need:.1f} GB > {max_memory_gb} GB"
                    else:
                        if passes == "fwd":
                            def fn(name=name):
                                with torch.no_grad():
                                    run(*args, backend=name)
                        else:
                            leaves = [t.detach().clone().requires_grad_() for t in args]
                            w = torch.randn_like(x)

                            def fn(name=name, leaves=leaves, w=w):
                                for t in leaves:
                                    t.grad = None
                                y = run(*leaves, backend=name)
                                (y * w).sum().backward()
                        row["seconds"], row["runs"] = time_call(fn, device, reps=reps, budget_s=budget_s)
                        row["gbps"] = io_bytes / row["seconds"] / 1e9
                    rows.append(row)
                    if verbose:
                        msg = row["skipped"] or f"{row['seconds'] * 1e3:9.2f} ms  ({row['runs']} runs)"
                        print(f"c={c:4d} L={L:6d}  {name:9s} {passes:7s} {msg}", flush=True)
    return rows


def summarise(rows) -> list[dict]:
    """Add the ratios: speed-up vs the reference loop and vs the textbook scan, time / copy floor."""
    key = {(r["backend"], r["pass"], r["channels"], r["L"]): r for r in rows}
    out = []
    for r in rows:
        if r["backend"] == "copy":
            continue
        s = dict(r)
        ref = key.get(("reference", r["pass"], r["channels"], r["L"]))
        par = key.get(("parallel", r["pass"], r["channels"], r["L"]))
        floor = key[("copy", "copy", r["channels"], r["L"])]
        s["x_vs_reference"] = ref["seconds"] / r["seconds"] if ref else float("nan")
        s["x_vs_textbook"] = par["seconds"] / r["seconds"] if par else float("nan")
        s["floor_ratio"] = r["seconds"] / floor["seconds"]
        out.append(s)
    return out


def format_table(summary) -> str:
    lines = [f"{'backend':9s} {'pass':7s} {'c':>4s} {'L':>6s} {'ms':>10s} {'runs':>4s} {'GB/s':>6s} "
             f"{'x ref':>7s} {'x textbk':>8s} {'/floor':>7s}"]
    for s in summary:
        if s["skipped"]:
            lines.append(f"{s['backend']:9s} {s['pass']:7s} {s['channels']:4d} {s['L']:6d}  skipped: {s['skipped']}")
            continue
        lines.append(
            f"{s['backend']:9s} {s['pass']:7s} {s['channels']:4d} {s['L']:6d} {s['seconds'] * 1e3:10.2f} {s['runs']:4d} "
            f"{s['gbps']:6.2f} {s['x_vs_reference']:7.1f} {s['x_vs_textbook']:8.1f} {s['floor_ratio']:7.1f}"
        )
    return "\n".join(lines)


def provenance(argv, device) -> dict:
    from . import __version__

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "command": "python -m lambdaskip.bench " + " ".join(argv),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lambdaskip": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if torch.device(device).type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": load,
        "profile": os.environ.get("LAMBDASKIP_PROFILE", "book"),
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m lambdaskip.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("scan", help="time the selective-scan backends (Mamba-1 or Mamba-2 layout)")
    p.add_argument("--layout", choices=["s6", "ssd"], default="s6", help="Mamba-1 (s6) or Mamba-2 (ssd) scan")
    p.add_argument("--headdim", type=int, default=64, help="ssd: channels per head")
    p.add_argument("--channels", type=int, nargs="+", default=[64, 256])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per cell before it stops repeating")
    p.add_argument("--max-memory-gb", type=float, default=3.0)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's default)")
    p.add_argument("--out", default=None, help="CSV path (default data/results/bench_scan_<cpu|gpu>.csv); '-' for none")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = scan_benchmark(args.channels, args.lengths, args.backends, batch=args.batch, n=args.n,
                          dtype=getattr(torch, args.dtype), device=device, reps=args.reps, budget_s=args.budget,
                          max_memory_gb=args.max_memory_gb, backward=not args.no_backward, threads=args.threads,
                          layout=args.layout, headdim=args.headdim)
    summary = summarise(rows)
    print()
    print(format_table(summary))
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # so that the provenance records the threads used
    meta = provenance(argv, device)
    meta["layout"] = args.layout
    if args.layout == "ssd":
        meta["headdim"] = args.headdim
    print("\n" + ", ".join(f"{k}={v}" for k, v in meta.items()))
    if args.out != "-":
        stem = "bench_scan" if args.layout == "s6" else "bench_ssd"
        out = Path(args.out) if args.out else Path("data/results") / f"{stem}_{'gpu' if device.type == 'cuda' else 'cpu'}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        import csv

        fields = ["backend", "pass", "channels", "L", "seconds", "runs", "gbps", "x_vs_reference", "x_vs_textbook",
                  "floor_ratio", "skipped"]
        copies = [dict(r, x_vs_reference=float("nan"), x_vs_textbook=float("nan"), floor_ratio=1.0) for r in rows
                  if r["backend"] == "copy"]
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for r in copies + summary:
                writer.writerow({k: r[k] for k in fields})
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in copies + summary]
        out.with_suffix(".json").write_text(json.dumps({**meta, "batch": args.batch, "n": args.n, "dtype": args.dtype,
                                                        "rows": clean}, indent=1, default=str))  # NaN → null: valid JSON
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
