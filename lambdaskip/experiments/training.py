"""The training grid of chapter 7: every architecture × λ setting × seed on MQAR and sequential images.

    python -m lambdaskip.experiments train --profile book            # ~30 min on an idle 2-core CPU
    python -m lambdaskip.experiments train --profile full            # paper-scale, one GPU
    python -m lambdaskip.experiments train --profile ci --out /tmp/x # a few steps (tests)

Results go to ``<out>/training_<profile>.csv`` (one row per run),
``<out>/training_<profile>_history.json`` (per-run history: loss, accuracy, λ and μ per layer at
every evaluation, λ every few steps) and ``<out>/training_<profile>.provenance.json`` (command,
profile, device, versions, threads, wall time). Runs already present in the history file are
skipped, so an interrupted grid continues where it stopped (``--fresh`` starts over); each run
also checkpoints after every epoch under ``--cache``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import sys
import time

import torch

__all__ = ["PROFILE_GRIDS", "PAPER_TABLE1", "grid_for", "run_grid", "load_results", "runs_frame", "summary_table",
           "paired_differences", "history_frame", "lambda_frame", "main"]

# Sizes per profile. "tasks" maps a task name to (data kwargs, training kwargs). Model and training
# sizes are our choices (the paper's exact hyper-parameters are not available to us).
PROFILE_GRIDS: dict[str, dict] = {
    "ci": dict(
        seeds=[0],
        settings=[(1.0, False), (1.0, True)],
        tasks=dict(
            mqar=(dict(n_train=256, n_test=64, vocab_size=32, seq_len=32, num_pairs=4),
                  dict(d_model=16, depth=2, n_heads=2, epochs=2, batch_size=32, lr=3e-3, log_every=2)),
            image=(dict(source="digits", max_train=256, max_test=128),
                   dict(d_model=16, depth=2, n_heads=2, epochs=2, batch_size=32, lr=3e-3, log_every=2)),
        ),
        expected="under a minute on one CPU core",
    ),
    "book": dict(
        seeds=[0, 1, 2],
        settings=[(1.0, False), (1.0, True)],
        tasks=dict(
            mqar=(dict(n_train=3000, n_test=500, vocab_size=32, seq_len=32, num_pairs=4),
                  dict(d_model=64, depth=2, n_heads=2, epochs=6, batch_size=64, lr=3e-3, log_every=10)),
            image=(dict(source="digits"),
                   dict(d_model=64, depth=2, n_heads=2, epochs=10, batch_size=32, lr=3e-3, log_every=10)),
        ),
        # Per-architecture overrides. Attention needs d=64 (2 heads of 16) to learn MQAR in this
        # budget (d=32 stalled near 18% in our trials with 8 pairs and 64 tokens); the SSM scans are the slowest mixers on a CPU,
        # so they run at d=32 (Mamba also with a state of 8 instead of 16).
        arch_kwargs=dict(mamba=dict(d_model=32, mixer_kwargs=dict(d_state=8)), mamba2=dict(d_model=32)),
        expected=("about 5-10 minutes on an idle 2-core CPU (measured: 48 runs, about 12 s of CPU time each; "
                  "14 min wall on a heavily shared machine); measured time in the provenance"),
    ),
    "full": dict(
        seeds=[0, 1, 2],
        settings=[(1.0, False), (1.0, True)],
        tasks=dict(
            mqar=(dict(n_train=100_000, n_test=3_000, vocab_size=8192, seq_len=256, num_pairs=16),
                  dict(d_model=128, depth=4, n_heads=4, epochs=16, batch_size=128, lr=1e-3, log_every=50)),
            image=(dict(source="auto", download=True),
                   dict(d_model=128, depth=4, n_heads=4, epochs=30, batch_size=64, lr=1e-3, log_every=50)),
        ),
        expected=("not measured (no GPU was available to us): 48 runs of ~12.5k steps (MQAR, 256 tokens) or "
                  "~23k steps (CIFAR-10, 1024 tokens); an unmeasured guess is on the order of a day on one GPU, "
                  "dominated by CIFAR-10 - time the first run, and split the grid with --archs/--seeds"),
    ),
}


def grid_for(profile: str, archs=None, seeds=None) -> list[dict]:
    """The list of runs (dicts with ``task, arch, lam, learnable, seed``) of a profile."""
    from ..models import available_architectures

    if profile not in PROFILE_GRIDS:
        raise ValueError(f"profile must be one of {sorted(PROFILE_GRIDS)}, got {profile!r}")
    spec = PROFILE_GRIDS[profile]
    have = available_architectures()
    archs = have if archs is None else list(archs)
    missing = [a for a in archs if a not in have]
    if missing:
        raise ValueError(f"architectures {missing} are not available (their mixers are not registered); available: {have}")
    seeds = spec["seeds"] if seeds is None else list(seeds)
    # Seed-major order: if a long grid is stopped early, every task x architecture x setting has the
    # same number of finished seeds.
    return [
        dict(task=task, arch=arch, lam=lam, learnable=learn, seed=seed)
        for seed in seeds for task in spec["tasks"] for arch in archs for (lam, learn) in spec["settings"]
    ]


def run_key(run: dict) -> str:
    kind = "learn" if run["learnable"] else "fixed"
    return f"{run['task']}-{run['arch']}-{kind}{run['lam']:g}-s{run['seed']}"


_DATA_CACHE: dict = {}


def _task_data(profile: str, task: str):
    from .. import tasks

    key = (profile, task)
    if key not in _DATA_CACHE:
        data_kw = dict(PROFILE_GRIDS[profile]["tasks"][task][0])
        if task == "mqar":
            _DATA_CACHE[key] = tasks.mqar(seed=0, **data_kw)
        else:
            _DATA_CACHE[key] = tasks.sequential_image(verbose=False, **data_kw)
    return _DATA_CACHE[key]


def _run_one(profile: str, run: dict, cache: str | None, device: str, threads: int) -> dict:
    """Train one run; returns a JSON-able record. Executed in worker processes."""
    from ..train import TrainConfig, train

    torch.set_num_threads(threads)
    data = _task_data(profile, run["task"])
    train_kw = dict(PROFILE_GRIDS[profile]["tasks"][run["task"]][1])
    train_kw.update(PROFILE_GRIDS[profile].get("arch_kwargs", {}).get(run["arch"], {}))
    cfg = TrainConfig(arch=run["arch"], lam=run["lam"], learnable_lambda=run["learnable"], seed=run["seed"], **train_kw)
    ckpt = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        ckpt = os.path.join(cache, run_key(run) + ".pt")
    cpu0 = time.process_time()
    result = train(data, cfg, checkpoint=ckpt, progress=False, device=device)
    cpu = time.process_time() - cpu0  # CPU time of this process: what the run costs on an idle core
    model = result.model
    return dict(
        key=run_key(run), run=run, data=data.description, data_name=data.name, chance=data.chance,
        config=result.config, history=result.history, lambda_log=result.lambda_log,
        final_acc=result.final_acc, best_acc=result.best_acc, seconds=result.seconds, cpu_seconds=cpu,
        n_params=sum(p.numel() for p in model.parameters()),
        block_options=getattr(model, "block_options", {}),
    )


CSV_FIELDS = ["task", "data", "arch", "setting", "lam0", "learnable", "seed", "final_acc", "best_acc",
              "chance", "final_lambdas", "first_loss", "last_loss", "seconds", "n_params"]


def _csv_row(rec: dict) -> dict:
    from ..train import lam_setting_label

    r = rec["run"]
    return dict(
        task=r["task"], data=rec["data_name"], arch=r["arch"], setting=lam_setting_label(r["lam"], r["learnable"]),
        lam0=r["lam"], learnable=r["learnable"], seed=r["seed"], final_acc=round(rec["final_acc"], 6),
        best_acc=round(rec["best_acc"], 6), chance=round(rec["chance"], 6),
        final_lambdas=json.dumps([round(v, 5) for v in rec["history"][-1]["lambdas"]]),
        first_loss=round(rec["history"][1]["train_loss"], 6), last_loss=round(rec["history"][-1]["train_loss"], 6),
        seconds=round(rec["seconds"], 2), n_params=rec["n_params"],
    )


def paths(out: str, profile: str) -> dict:
    return dict(
        csv=os.path.join(out, f"training_{profile}.csv"),
        history=os.path.join(out, f"training_{profile}_history.json"),
        provenance=os.path.join(out, f"training_{profile}.provenance.json"),
    )


def _write(out: str, profile: str, records: dict, provenance: dict) -> None:
    os.makedirs(out, exist_ok=True)
    p = paths(out, profile)
    ordered = [records[k] for k in sorted(records)]
    with open(p["csv"] + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for rec in ordered:
            w.writerow(_csv_row(rec))
    os.replace(p["csv"] + ".tmp", p["csv"])
    with open(p["history"] + ".tmp", "w") as f:
        json.dump(dict(profile=profile, runs=ordered), f)
    os.replace(p["history"] + ".tmp", p["history"])
    with open(p["provenance"] + ".tmp", "w") as f:
        json.dump(provenance, f, indent=2)
    os.replace(p["provenance"] + ".tmp", p["provenance"])


def run_grid(profile: str, *, out: str = "data/results", archs=None, seeds=None, jobs: int = 1,
             threads: int | None = None, cache: str | None = None, fresh: bool = False,
             device: str = "cpu", note: str = "", command: str | None = None, verbose: bool = True) -> dict:
    """Run (or continue) the grid of ``profile``; returns ``{key: record}`` of all finished runs."""
    from .. import __version__
    from ..models import ARCHITECTURES, available_architectures

    runs = grid_for(profile, archs, seeds)
    p = paths(out, profile)
    records: dict = {}
    if not fresh and os.path.exists(p["history"]):
        with open(p["history"]) as f:
            records = {rec["key"]: rec for rec in json.load(f)["runs"]}
    todo = [r for r in runs if run_key(r) not in records]
    if fresh and cache:  # a fresh grid must not resume from checkpoints of an earlier configuration
        for r in todo:
            stale = os.path.join(cache, run_key(r) + ".pt")
            if os.path.exists(stale):
                os.remove(stale)
    jobs = max(1, int(jobs))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    prev_wall = 0.0
    if records and os.path.exists(p["provenance"]):
        with open(p["provenance"]) as f:
            prev_wall = float(json.load(f).get("wall_seconds", 0.0))
    start = time.perf_counter()
    provenance = dict(
        command=command or f"run_grid(profile={profile!r})",
        profile=profile, device=device, jobs=jobs, threads_per_job=threads,
        cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
        torch=torch.__version__, lambdaskip=__version__,
        started_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        architectures=sorted({r["arch"] for r in runs}),
        architectures_missing=[a for a in ARCHITECTURES if a not in available_architectures()],
        grid=PROFILE_GRIDS[profile], expected_time=PROFILE_GRIDS[profile]["expected"], note=note,
        n_runs=len(runs),
    )

    def finish(rec):
        records[rec["key"]] = rec
        provenance.update(n_done=len(records), wall_seconds=prev_wall + time.perf_counter() - start,
                          finished_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        _write(out, profile, records, provenance)
        if verbose:
            print(f"[{len(records)}/{len(runs)}] {rec['key']}: final acc {rec['final_acc']:.3f} "
                  f"(best {rec['best_acc']:.3f}), λ={['%.3f' % v for v in rec['history'][-1]['lambdas']]}, "
                  f"{rec['seconds']:.1f} s", flush=True)

    if verbose:
        print(f"training grid '{profile}': {len(runs)} runs, {len(todo)} to do, {jobs} job(s) × {threads} thread(s); "
              f"expected {PROFILE_GRIDS[profile]['expected']}", flush=True)
    if jobs == 1:
        for r in todo:
            finish(_run_one(profile, r, cache, device, threads))
    else:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_run_one, profile, r, cache, device, threads) for r in todo]
            for fut in cf.as_completed(futures):
                finish(fut.result())
    if not todo:  # nothing new: still (re)write the files so that they exist
        provenance.update(n_done=len(records), wall_seconds=prev_wall)
        _write(out, profile, records, provenance)
    return records


def load_results(profile: str = "book", out: str = "data/results") -> tuple[list[dict], dict]:
    """The saved runs (list of records, see :func:`run_grid`) and the provenance of ``profile``."""
    p = paths(out, profile)
    for key in ("history", "provenance"):
        if not os.path.exists(p[key]):
            raise FileNotFoundError(
                f"{p[key]} not found: run `python -m lambdaskip.experiments train --profile {profile}` first"
            )
    with open(p["history"]) as f:
        runs = json.load(f)["runs"]
    with open(p["provenance"]) as f:
        prov = json.load(f)
    return runs, prov


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambdaskip.experiments train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILE_GRIDS), default=None,
                        help="size profile (default: $LAMBDASKIP_PROFILE or book)")
    parser.add_argument("--out", default="data/results", help="results folder (default: data/results)")
    parser.add_argument("--archs", nargs="+", default=None, help="architectures (default: all available)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: 2 for book on CPU, else 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--cache", default=None, help="checkpoint folder (default: data/results/checkpoints/training/<profile>, git-ignored)")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results of this profile")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--note", default="", help="free text stored in the provenance (e.g. 'machine shared')")
    args = parser.parse_args(argv)
    from ..profiles import current_profile, pick_device

    profile = args.profile or current_profile()
    device = args.device or str(pick_device())
    jobs = args.jobs or (2 if device == "cpu" and profile != "ci" else 1)
    cache = args.cache or os.path.join("data", "results", "checkpoints", "training", profile)
    try:
        run_grid(profile, out=args.out, archs=args.archs, seeds=args.seeds, jobs=jobs, threads=args.threads,
                 cache=cache, fresh=args.fresh, device=device, note=args.note,
                 command="python -m lambdaskip.experiments train " + " ".join(argv if argv is not None else sys.argv[1:]))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------------------------------
# Reading the results (used by chapter 7)

#: Table 1 of the paper as far as we could reconstruct it (accuracy in %, λ = 1 / learnable λ).
#: ``None`` marks cells we could not find; they are shown as "n/a", never filled in. The order of
#: the Transformer Image pair is uncertain in our source.
PAPER_TABLE1: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("image", "transformer"): (32.64, 32.85),
    ("image", "linear"): (34.10, 32.80),
    ("image", "mamba"): (None, None),
    ("image", "mamba2"): (42.28, 38.92),
    ("mqar", "transformer"): (99.6, 98.9),
    ("mqar", "linear"): (None, None),
    ("mqar", "mamba"): (81.5, 85.3),
    ("mqar", "mamba2"): (97.3, 99.1),
}


def runs_frame(runs: list[dict]):
    """One row per run: ``task, data, arch, setting, seed, final_acc, best_acc, chance, seconds, lambdas``."""
    import pandas as pd

    from ..train import lam_setting_label

    rows = []
    for rec in runs:
        r = rec["run"]
        rows.append(dict(
            task=r["task"], data=rec["data_name"], arch=r["arch"], setting=lam_setting_label(r["lam"], r["learnable"]),
            learnable=bool(r["learnable"]), seed=r["seed"], final_acc=rec["final_acc"], best_acc=rec["best_acc"],
            chance=rec["chance"], seconds=rec["seconds"], lambdas=rec["history"][-1]["lambdas"],
        ))
    return pd.DataFrame(rows)


def summary_table(runs: list[dict]):
    """Mean ± std (over seeds) of the final test accuracy in %, per task × architecture × λ setting,
    beside the paper's reported numbers. Columns: ``task, arch, setting, n_seeds, mean, std, paper``."""
    import pandas as pd

    df = runs_frame(runs)
    g = df.groupby(["task", "arch", "setting"])["final_acc"]
    out = pd.DataFrame(dict(n_seeds=g.size(), mean=100 * g.mean(), std=100 * g.std(ddof=1))).reset_index()

    def paper(row):
        pair = PAPER_TABLE1.get((row["task"], row["arch"]), (None, None))
        value = pair[1] if row["setting"] == "learnable" else pair[0] if row["setting"] == "λ=1" else None
        return "n/a" if value is None else f"{value:.2f}"

    out["paper"] = out.apply(paper, axis=1)
    return out


def paired_differences(runs: list[dict]):
    """Learnable minus fixed (λ=1) final accuracy in percentage points, paired by seed.

    Columns: ``task, arch, n, mean_diff, std_diff, se`` (standard error of the mean difference),
    ``t`` (= mean_diff / se), ``p`` (two-sided paired t-test, n-1 degrees of freedom; NaN for n < 2)
    and ``ci_low, ci_high`` (95% confidence interval of the mean difference).
    """
    import numpy as np
    import pandas as pd
    from scipy import stats  # lazy: scipy comes with scikit-learn (the `data` extra)

    df = runs_frame(runs)
    piv = df.pivot_table(index=["task", "arch", "seed"], columns="setting", values="final_acc")
    if not {"λ=1", "learnable"} <= set(piv.columns):
        raise ValueError("the runs must contain both the λ=1 and the learnable setting")
    diff = (100 * (piv["learnable"] - piv["λ=1"])).dropna().rename("diff").reset_index()
    g = diff.groupby(["task", "arch"])["diff"]
    out = pd.DataFrame(dict(n=g.size(), mean_diff=g.mean(), std_diff=g.std(ddof=1))).reset_index()
    out["se"] = out["std_diff"] / np.sqrt(out["n"])
    dof = (out["n"] - 1).clip(lower=1)
    out["t"] = out["mean_diff"] / out["se"]
    out["p"] = np.where(out["n"] >= 2, 2 * stats.t.sf(out["t"].abs(), dof), np.nan)
    half = stats.t.ppf(0.975, dof) * out["se"]
    out["ci_low"], out["ci_high"] = out["mean_diff"] - half, out["mean_diff"] + half
    return out


def history_frame(runs: list[dict]):
    """Long table of every evaluation: ``task, arch, setting, seed, epoch, step, layer, mu, lam, test_acc``.

    ``layer`` 0 is the embedding output (μ only, ``lam`` NaN); layers 1..K are the blocks.
    """
    import pandas as pd

    from ..train import lam_setting_label

    rows = []
    for rec in runs:
        r = rec["run"]
        setting = lam_setting_label(r["lam"], r["learnable"])
        for h in rec["history"]:
            for layer, mu in enumerate(h["mu"]):
                rows.append(dict(task=r["task"], arch=r["arch"], setting=setting, seed=r["seed"], epoch=h["epoch"],
                                 step=h["step"], layer=layer, mu=mu,
                                 lam=h["lambdas"][layer - 1] if layer else float("nan"), test_acc=h["test_acc"]))
    return pd.DataFrame(rows)


def lambda_frame(runs: list[dict]):
    """Every logged λ of the learnable runs: ``task, arch, seed, step, layer (1..K), lam``."""
    import pandas as pd

    rows = []
    for rec in runs:
        r = rec["run"]
        if not r["learnable"]:
            continue
        for step, lams in rec["lambda_log"]:
            for layer, lam in enumerate(lams, start=1):
                rows.append(dict(task=r["task"], arch=r["arch"], seed=r["seed"], step=step, layer=layer, lam=lam))
    return pd.DataFrame(rows)
