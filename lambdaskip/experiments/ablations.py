"""Ablations at scale (chapter 6): μ̃ over depth across architectures, λ, normalisation, gating, MLP —
and λ-surgery on a real pretrained network.

One command runs everything for a size profile, shows a progress bar, writes tidy CSV files plus a
provenance JSON into ``data/results/`` and resumes after an interruption (finished configurations
are skipped)::

    python -m lambdaskip.experiments ablations --profile book      # ~minutes on a 2-core CPU
    python -m lambdaskip.experiments ablations --profile full      # one Colab GPU session
    python -m lambdaskip.experiments ablations --profile ci --out /tmp/x   # seconds

Files (``P`` = profile):

* ``ablations_P.csv`` — synthetic stacks; columns ``arch, norm, gate, mlp, lam, layer, mean, std, n,
  n_nan`` (mean/std of μ̃ over the inputs at that layer, std with ddof=1; ``n`` finite values;
  ``n_nan`` inputs whose activations overflowed by that layer — possible without normalisation).
* ``ablations_P_pretrained.csv`` — the pretrained all-MiniLM-L6-v2 after λ-surgery, on the 32
  passages of ``data/passages``; columns ``model, lam, depth, gating, layer, mean, std, n``.
* ``ablations_P.json`` — provenance: command, profile, seed, device, dtype, versions, dates, runtimes,
  the sizes and grids used, and anything skipped.

Design: for each configuration ``(arch, norm, gate, mlp)`` one stack is built from a fixed seed and
every λ of the grid is run through *the same weights and the same inputs* (λ lives in a buffer of
each block), so curves differ only by λ. The unit of resumption is that configuration.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from .. import __version__
from ..blocks import LambdaSkipStack
from ..mixers import available_mixers
from ..profiles import PROFILES
from ..metrics import normalized_mu

__all__ = [
    "ARCHS",
    "NORMS",
    "SIZES",
    "PRETRAINED_SIZES",
    "sizes_for",
    "configurations",
    "mu_layers",
    "run_configuration",
    "run_sweep",
    "run_pretrained",
    "results_dir",
    "load_results",
    "select",
    "final_layer",
    "sign_asymmetry",
    "plot_curves",
    "main",
]

# architecture label -> registered mixer name
ARCHS = {
    "softmax attention": "softmax",
    "linear attention": "linear",
    "LTI SSM (S4D)": "s4d",
    "Mamba-1 (S6)": "s6",
    "Mamba-2 (SSD)": "ssd",
}
# normalisation label -> (norm kind, position) of LambdaSkipStack.build
NORMS = {"none": ("none", "post"), "rms-post": ("rms", "post"), "rms-pre": ("rms", "pre")}

_ALL = dict(archs=tuple(ARCHS), norms=tuple(NORMS), gates=(False, True), mlps=(False, True))
SIZES = {
    "ci": dict(_ALL, archs=("softmax attention", "Mamba-2 (SSD)"), mlps=(False,), depth=8, n_inputs=32,
               n_tokens=12, d_model=16, lambdas=(-10.0, -1.0, 0.0, 0.5, 1.0, 10.0)),
    "book": dict(_ALL, depth=24, n_inputs=32, n_tokens=32, d_model=32,
                 lambdas=(-10.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 10.0)),
    "full": dict(_ALL, depth=64, n_inputs=64, n_tokens=128, d_model=64,
                 lambdas=(-100.0, -30.0, -10.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0)),
}
PRETRAINED_SIZES = {
    "ci": dict(n_passages=4, n_tokens=128, lambdas=(0.0, 1.0, 10.0), unroll_depth=None, unroll_lambdas=()),
    "book": dict(n_passages=32, n_tokens=128, lambdas=(-30.0, -10.0, -3.0, -1.0, 0.0, 0.5, 1.0, 3.0, 10.0, 30.0),
                 unroll_depth=24, unroll_lambdas=(-10.0, 0.0, 1.0, 3.0, 10.0)),
    "full": dict(n_passages=32, n_tokens=128,
                 lambdas=(-100.0, -30.0, -10.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0),
                 unroll_depth=64, unroll_lambdas=(-10.0, -1.0, 0.0, 1.0, 3.0, 10.0, 100.0)),
}
SYNTH_COLUMNS = ["arch", "norm", "gate", "mlp", "lam", "layer", "mean", "std", "n", "n_nan"]
KEY = ["arch", "norm", "gate", "mlp"]


def sizes_for(profile: str) -> dict:
    """The synthetic-sweep sizes and grids of a profile (a copy)."""
    if profile not in SIZES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return dict(SIZES[profile])


def configurations(sizes: dict) -> list[dict]:
    """Every ``(arch, norm, gate, mlp)`` configuration of the grid, in a fixed order."""
    return [
        dict(arch=a, norm=n, gate=g, mlp=m)
        for a in sizes["archs"] for n in sizes["norms"] for g in sizes["gates"] for m in sizes["mlps"]
    ]


def _config_seed(cfg: dict, seed: int) -> int:
    # weights depend on the architecture and the options (not on λ), reproducibly across runs
    arch_index = list(ARCHS).index(cfg["arch"])
    norm_index = list(NORMS).index(cfg["norm"])
    return seed * 1000 + arch_index * 100 + norm_index * 10 + 2 * int(cfg["gate"]) + int(cfg["mlp"])


def _inputs(sizes: dict, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sizes["n_inputs"], sizes["n_tokens"], sizes["d_model"], generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


_FAILURES = (ValueError, FloatingPointError, RuntimeError)


def _step(block, y: torch.Tensor, alive: torch.Tensor):
    """Apply one block; if it raises (a mixer met Inf/NaN in an intermediate, or an exactly zero row
    hit the exact RMS normalisation), retry input by input and drop only the inputs that fail."""
    try:
        return block(y), alive
    except _FAILURES:
        keep, outs = [], []
        for i in range(y.shape[0]):
            try:
                outs.append(block(y[i : i + 1]))
                keep.append(i)
            except _FAILURES:
                pass
        if not keep:
            return y[:0], alive[:0]
        return torch.cat(outs), alive[keep]


@torch.no_grad()
def mu_layers(stack: LambdaSkipStack, x: torch.Tensor) -> torch.Tensor:
    """μ̃ after every layer, ``(K+1, batch)`` float64, robust to overflow.

    Like :func:`~lambdaskip.experiments.mu_over_depth`, but an input whose activations become
    non-finite (or that makes a block raise) is dropped from then on and gets NaN for the remaining
    layers, while the other inputs go on — so one overflowing input never hides the earlier layers or
    the other inputs. Row 0 is the (normalised) input.
    """
    batch = x.shape[0]
    out = torch.full((stack.depth + 1, batch), float("nan"), dtype=torch.float64)
    alive = torch.arange(batch)
    y = stack.input_norm(x)
    for k in range(stack.depth + 1):
        if k > 0:
            y, alive = _step(stack.blocks[k - 1], y, alive)
        finite = torch.isfinite(y).flatten(1).all(-1)
        y, alive = y[finite], alive[finite.cpu()]
        if alive.numel() == 0:
            break
        out[k, alive] = normalized_mu(y.to(torch.float64)).cpu()  # float64: squares of big float32 values overflow
    return out


def _summarise(curves: torch.Tensor):
    """``(K+1, batch)`` μ̃ → per layer (mean, std, n finite, n NaN)."""
    out = []
    for row in curves.cpu():
        finite = row[torch.isfinite(row)]
        n = int(finite.numel())
        out.append((float(finite.mean()) if n else math.nan, float(finite.std()) if n > 1 else math.nan,
                    n, int(row.numel()) - n))
    return out


def run_configuration(cfg: dict, sizes: dict, *, seed: int = 0, dtype=torch.float64, device="cpu",
                      x: torch.Tensor | None = None, errors: list | None = None) -> pd.DataFrame:
    """μ̃ per layer for every λ of ``sizes["lambdas"]`` in one configuration (same weights, same inputs).

    Returns rows with the columns of ``ablations_P.csv``. A λ whose run raises (e.g. an exactly zero
    token under the exact RMS normalisation) is recorded as NaN rows and its message appended to
    ``errors``.
    """
    if cfg["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {cfg['arch']!r}")
    if cfg["norm"] not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {cfg['norm']!r}")
    norm, position = NORMS[cfg["norm"]]
    torch.manual_seed(_config_seed(cfg, seed))
    stack = LambdaSkipStack.build(
        ARCHS[cfg["arch"]], d_model=sizes["d_model"], depth=sizes["depth"], norm=norm,
        norm_position=position, gate=bool(cfg["gate"]), mlp=bool(cfg["mlp"]),
    ).to(device=device, dtype=dtype).eval()
    if x is None:
        x = _inputs(sizes, seed, dtype, device)
    rows = []
    for lam in sizes["lambdas"]:
        for block in stack.blocks:
            block.lam.fill_(float(lam))
        try:
            stats = _summarise(mu_layers(stack, x))
        except _FAILURES as exc:  # recorded, not hidden (mu_layers already handles overflow per input)
            stats = [(math.nan, math.nan, 0, x.shape[0])] * (sizes["depth"] + 1)
            if errors is not None:
                errors.append(f"{cfg} lam={lam}: {exc}")
        for layer, (mean, std, n, n_nan) in enumerate(stats):
            rows.append((cfg["arch"], cfg["norm"], bool(cfg["gate"]), bool(cfg["mlp"]), float(lam), layer,
                         mean, std, n, n_nan))
    return pd.DataFrame(rows, columns=SYNTH_COLUMNS)


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    df = pd.read_csv(path)
    for col in ("gate", "mlp", "gating"):
        if col in df:
            df[col] = df[col].astype(str).str.lower().map({"true": True, "false": False})
    return df


def run_sweep(sizes: dict, *, out_csv: str | Path | None = None, seed: int = 0, dtype=torch.float64,
              device="cpu", resume: bool = True, progress: bool = True, errors: list | None = None) -> pd.DataFrame:
    """Run every configuration of ``sizes``; append each finished one to ``out_csv`` (if given).

    With ``resume=True`` configurations already in ``out_csv`` are skipped, so an interrupted run
    continues where it stopped. Architectures whose mixer is not registered are skipped with a note in
    ``errors``. Returns the whole table (old and new rows).
    """
    from tqdm.auto import tqdm

    out_csv = Path(out_csv) if out_csv is not None else None
    done = set()
    frames = []
    if out_csv is not None:
        old = _read_csv(out_csv) if resume else None
        if old is not None:
            frames.append(old)
            done = {tuple(k) for k in old[KEY].drop_duplicates().itertuples(index=False)}
        elif out_csv.exists():
            out_csv.unlink()
        out_csv.parent.mkdir(parents=True, exist_ok=True)
    registered = set(available_mixers())
    todo = []
    for cfg in configurations(sizes):
        if ARCHS[cfg["arch"]] not in registered:
            if errors is not None and f"mixer {ARCHS[cfg['arch']]!r} not available" not in errors:
                errors.append(f"mixer {ARCHS[cfg['arch']]!r} not available")
            continue
        if (cfg["arch"], cfg["norm"], cfg["gate"], cfg["mlp"]) not in done:
            todo.append(cfg)
    x = _inputs(sizes, seed, dtype, device)
    bar = tqdm(todo, desc="ablation configs", disable=not progress)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg['arch']} | {cfg['norm']} | gate={cfg['gate']} | mlp={cfg['mlp']}")
        df = run_configuration(cfg, sizes, seed=seed, dtype=dtype, device=device, x=x, errors=errors)
        frames.append(df)
        if out_csv is not None:  # one append per configuration: the resume unit
            df.to_csv(out_csv, mode="a", header=not out_csv.exists() or out_csv.stat().st_size == 0, index=False)
    if not frames:
        return pd.DataFrame(columns=SYNTH_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def run_pretrained(psizes: dict, *, out_csv: str | Path | None = None, resume: bool = True,
                   progress: bool = True, device="cpu") -> pd.DataFrame:
    """λ-surgery on all-MiniLM-L6-v2 over the shipped passages (offline). Resumable per (λ, depth).

    Rows: ``model, lam, depth, gating, layer, mean, std, n``.
    """
    from tqdm.auto import tqdm

    from .. import pretrained as P

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_csv = Path(out_csv) if out_csv is not None else None
    old = _read_csv(out_csv) if (out_csv is not None and resume) else None
    if out_csv is not None and old is None and out_csv.exists():
        out_csv.unlink()
    done = set() if old is None else {(float(a), int(b)) for a, b in old[["lam", "depth"]].drop_duplicates().itertuples(index=False)}
    model, tok = P.load_minilm(device=device)
    native = model.config.num_hidden_layers
    texts = [r["text"] for r in P.load_passages()][: psizes["n_passages"]]
    ids = P.tokenize_passages(tok, texts, psizes["n_tokens"]).to(device)
    jobs = [(lam, native) for lam in psizes["lambdas"]]
    if psizes.get("unroll_depth"):
        jobs += [(lam, psizes["unroll_depth"]) for lam in psizes["unroll_lambdas"]]
    jobs = [j for j in jobs if (float(j[0]), int(j[1])) not in done]
    frames = [old] if old is not None else []
    for lam, depth in tqdm(jobs, desc="pretrained λ-surgery", disable=not progress):
        df = P.lambda_depth_sweep(model, ids, [lam], depth=depth)
        df.insert(0, "model", "all-MiniLM-L6-v2")
        frames.append(df)
        if out_csv is not None:
            out_csv.parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(out_csv, mode="a", header=not out_csv.exists() or out_csv.stat().st_size == 0, index=False)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def results_dir() -> Path:
    """``data/results`` of the repository checkout; ``./data/results`` when the package is installed
    without one (e.g. ``pip install`` on Colab)."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "data").is_dir() and (repo / "lambdaskip").is_dir():
        return repo / "data" / "results"
    return Path.cwd() / "data" / "results"


def load_results(profile: str = "book", *, directory: str | Path | None = None):
    """Saved results of a profile: ``(synthetic DataFrame, pretrained DataFrame or None, provenance dict)``.

    Raises FileNotFoundError (naming the command that makes them) when the files are missing.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    d = Path(directory) if directory is not None else results_dir()
    synth, meta = d / f"ablations_{profile}.csv", d / f"ablations_{profile}.json"
    if not synth.is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"{synth} / {meta} missing: run `python -m lambdaskip.experiments ablations --profile {profile}`"
        )
    pre = _read_csv(d / f"ablations_{profile}_pretrained.csv")
    return _read_csv(synth), pre, json.loads(meta.read_text())


def select(df: pd.DataFrame, **where) -> pd.DataFrame:
    """Rows of a results table matching every ``column=value`` (a list/tuple value means "any of")."""
    mask = pd.Series(True, index=df.index)
    for col, value in where.items():
        if col not in df:
            raise ValueError(f"unknown column {col!r}; columns are {list(df.columns)}")
        mask &= df[col].isin(value) if isinstance(value, (list, tuple, set)) else df[col] == value
    return df[mask]


def final_layer(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last layer of each curve (for synthetic and pretrained tables alike)."""
    group = [c for c in ("arch", "norm", "gate", "mlp", "model", "depth", "gating") if c in df]
    last = df.groupby(group, dropna=False)["layer"].transform("max") if group else df["layer"].max()
    return df[df["layer"] == last]


def sign_asymmetry(df: pd.DataFrame) -> pd.DataFrame:
    """Compare λ with −λ at the last layer: one row per configuration and |λ| > 0 present with both signs.

    Columns: the configuration keys, ``abs_lam``, ``mu_neg`` (μ̃ at −|λ|), ``mu_pos`` (μ̃ at +|λ|) and
    ``diff = mu_neg − mu_pos``. Pairs where either side overflowed (NaN) are dropped.
    """
    last = final_layer(df)
    keys = [c for c in ("arch", "norm", "gate", "mlp", "model", "depth", "gating") if c in last]
    neg = last[last.lam < 0].assign(abs_lam=lambda t: -t.lam)[keys + ["abs_lam", "mean"]]
    pos = last[last.lam > 0].assign(abs_lam=lambda t: t.lam)[keys + ["abs_lam", "mean"]]
    both = neg.merge(pos, on=keys + ["abs_lam"], suffixes=("_neg", "_pos")).dropna(subset=["mean_neg", "mean_pos"])
    both = both.rename(columns={"mean_neg": "mu_neg", "mean_pos": "mu_pos"})
    return both.assign(diff=both.mu_neg - both.mu_pos).reset_index(drop=True)


def plot_curves(df: pd.DataFrame, *, ax=None, hue: str = "lam", logy: bool = True, floor: float = 1e-8,
                title: str | None = None, legend: bool = True):
    """μ̃ against layer from a summary table (columns ``layer, mean, std`` and ``hue``): mean line and a
    ±1 std band per ``hue`` value. Values below ``floor`` are drawn at the floor on a log axis; layers
    that overflowed (NaN) are left blank. Returns the axes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots()
    values = sorted(df[hue].unique())
    # distinct hues: λ = 0 and λ = 1 must stay visible (a diverging map would paint them grey)
    palette = sns.color_palette("husl" if len(values) > 10 else "tab10", len(values))
    for colour, value in zip(palette, values):
        part = df[df[hue] == value].sort_values("layer")
        mean = part["mean"].to_numpy()
        std = part["std"].fillna(0).to_numpy()
        low, high = mean - std, mean + std
        if logy:
            mean, low, high = (v.clip(min=floor) for v in (mean, low, high))
        label = f"λ = {value:g}" if hue == "lam" else f"{hue} = {value}"
        ax.plot(part["layer"], mean, color=colour, marker="o", markersize=2.5, label=label)
        ax.fill_between(part["layer"], low, high, color=colour, alpha=0.15, linewidth=0)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("layer k")
    ax.set_ylabel(r"$\tilde\mu(Y^k)$")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=7, ncol=2)
    return ax


def _provenance(path: Path, update: dict) -> dict:
    meta = json.loads(path.read_text()) if path.is_file() else {}
    runs = meta.get("runs", [])
    meta.update(update)
    meta["runs"] = runs + [update.pop("_run")] if "_run" in update else runs
    meta.pop("_run", None)
    meta["runtime_s_total"] = round(sum(r.get("seconds", 0.0) for r in meta["runs"]), 1)
    path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def main(argv=None) -> int:
    """Command line: ``python -m lambdaskip.experiments ablations [--profile P] [--out DIR] ...``."""
    parser = argparse.ArgumentParser(prog="python -m lambdaskip.experiments ablations", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default=None, help="size profile (default: $LAMBDASKIP_PROFILE or book)")
    parser.add_argument("--out", default=None, help="output folder (default: data/results of the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--only", choices=("all", "synthetic", "pretrained"), default="all")
    parser.add_argument("--fresh", action="store_true", help="discard saved results of this profile instead of resuming")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default 1: the tensors are small, and on a shared "
                             "2-core machine extra threads only add contention)")
    args = parser.parse_args(list(argv or []))

    from ..profiles import current_profile, pick_device

    profile = args.profile or current_profile()
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    out = Path(args.out) if args.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / f"ablations_{profile}.json"
    if args.fresh and meta_path.exists():
        meta_path.unlink()
    errors: list[str] = []
    start = time.time()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sizes = sizes_for(profile)
    timings = {}
    if args.only in ("all", "synthetic"):
        t0 = time.time()
        synth = run_sweep(sizes, out_csv=out / f"ablations_{profile}.csv", seed=args.seed, dtype=dtype,
                          device=device, resume=not args.fresh, progress=not args.no_progress, errors=errors)
        timings["synthetic_s"] = round(time.time() - t0, 1)
        print(f"synthetic sweep: {len(synth)} rows in {timings['synthetic_s']} s")
    if args.only in ("all", "pretrained"):
        t0 = time.time()
        try:
            pre = run_pretrained(PRETRAINED_SIZES[profile], out_csv=out / f"ablations_{profile}_pretrained.csv",
                                 resume=not args.fresh, progress=not args.no_progress, device=device)
            print(f"pretrained λ-surgery: {len(pre)} rows")
        except (ImportError, FileNotFoundError) as exc:  # optional deps / passages missing: say so, keep the rest
            errors.append(f"pretrained part skipped: {exc}")
            print(f"pretrained part skipped: {exc}", file=sys.stderr)
        timings["pretrained_s"] = round(time.time() - t0, 1)
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    cmd = "python -m lambdaskip.experiments ablations " + " ".join(argv or [])
    meta = _provenance(meta_path, {
        "command": cmd.strip(),
        "profile": profile,
        "seed": args.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": tf_version,
        "python": platform.python_version(),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        "pretrained_sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in PRETRAINED_SIZES[profile].items()},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": errors,
        "_run": {"started_utc": started, "seconds": round(time.time() - start, 1), "only": args.only, **timings},
    })
    print(f"wrote {out}/ablations_{profile}*.csv and {meta_path.name}; total runtime {meta['runtime_s_total']} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
