"""Remove outputs and execution counts from every .ipynb below a folder (the committed twins carry none).

Usage: python tools/strip_outputs.py FOLDER
"""
import pathlib
import sys

import nbformat

for path in sorted(pathlib.Path(sys.argv[1]).rglob("*.ipynb")):
    if "_build" in path.parts or ".ipynb_checkpoints" in path.parts:
        continue
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(nb, path)
        print(f"stripped outputs from {path}")
