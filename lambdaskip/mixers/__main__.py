"""``python -m lambdaskip.mixers``: print the float64 equivalence table of every mixer."""
from __future__ import annotations

import argparse

import pandas as pd

from .framework import equivalence_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16, help="sequence length N")
    parser.add_argument("--d-model", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table = equivalence_table(args.batch, args.tokens, args.d_model, seed=args.seed)
    print(f"forward(x) vs combine(M(x) V(x)) in float64; batch={args.batch}, N={args.tokens}, d_model={args.d_model}")
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.drop(columns=["formula"]).to_string(index=False))
    worst = table["max |forward − M·V|"].max()
    print(f"largest error over all mixers: {worst:.2e}")
    return 0 if worst < 1e-10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
