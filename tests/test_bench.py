"""The benchmark (``python -m lambdaskip.bench scan``) at tiny sizes: every backend is timed in both
layouts, the ratios are computed against the right rows, and the CLI writes its table with provenance."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from lambdaskip import bench, scan


@pytest.mark.parametrize("layout", ["s6", "ssd"])
def test_rows_and_ratios(layout):
    backends = [b for b in ("reference", "chunked", "parallel", "fused") if b in scan.available_backends("cpu")]
    rows = bench.scan_benchmark(channels=(8,), lengths=(16, 33), backends=backends, reps=2, budget_s=5.0,
                                verbose=False, layout=layout, headdim=4)
    assert {(r["backend"], r["pass"]) for r in rows} == {("copy", "copy")} | {
        (b, p) for b in backends for p in ("fwd", "fwd+bwd")}
    assert all(r["seconds"] > 0 and r["runs"] >= 1 and not r["skipped"] for r in rows)
    summary = bench.summarise(rows)
    by = {(s["backend"], s["pass"], s["L"]): s for s in summary}
    for (name, passes, L), s in by.items():
        ref, copy = by[("reference", passes, L)], next(r for r in rows if r["backend"] == "copy" and r["L"] == L)
        assert math.isclose(s["x_vs_reference"], ref["seconds"] / s["seconds"])
        assert math.isclose(s["floor_ratio"], s["seconds"] / copy["seconds"])


def test_bad_layout_and_headdim_are_clear_errors():
    with pytest.raises(ValueError, match="layout"):
        bench.scan_benchmark(channels=(8,), lengths=(4,), layout="mamba", verbose=False)
    with pytest.raises(ValueError, match="headdim"):
        bench.scan_benchmark(channels=(6,), lengths=(4,), layout="ssd", headdim=4, verbose=False)


def test_cli_writes_csv_and_provenance(tmp_path, capsys):
    out = tmp_path / "b.csv"
    assert bench.main(["scan", "--layout", "ssd", "--headdim", "4", "--channels", "8", "--lengths", "20",
                       "--backends", "reference", "chunked", "--reps", "1", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table.backend) == {"copy", "reference", "chunked"} and set(table["pass"]) == {"copy", "fwd", "fwd+bwd"}
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["layout"] == "ssd" and meta["headdim"] == 4 and meta["torch"] == torch.__version__
    assert "x ref" in capsys.readouterr().out
