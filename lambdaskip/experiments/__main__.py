"""Command line for the long experiments.

    python -m lambdaskip.experiments ablations --profile book   # the ablation sweeps (chapter 6)
    python -m lambdaskip.experiments train --profile book       # the training grid (chapter 7)

Each sub-command lives in its own module (``ablations.main`` / ``training.main``), imported lazily.
"""
import importlib
import sys

COMMANDS = {"ablations": "lambdaskip.experiments.ablations", "train": "lambdaskip.experiments.training"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\nsub-commands: {', '.join(COMMANDS)}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
