"""Repository conventions: notebook twins in sync and without outputs, the table of contents,
one repository address, and the same pins for pip and conda."""
import pathlib
import re

import jupytext
import nbformat
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
SOURCES = sorted(p for p in BOOK.glob("*.md") if "jupytext" in p.read_text()[:400])


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_chapters():
    assert len(SOURCES) >= 2


@pytest.mark.parametrize("md", SOURCES, ids=lambda p: p.name)
def test_twin_exists_in_sync_and_has_no_outputs(md):
    twin = md.with_suffix(".ipynb")
    assert twin.exists(), f"{twin.name} missing: run `make sync`"
    from_md = jupytext.read(md)
    from_ipynb = nbformat.read(twin, as_version=4)
    assert _cells(from_md) == _cells(from_ipynb), f"{md.name} and {twin.name} differ: run `make sync`"
    for cell in from_ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{twin.name} carries outputs: run `make sync`"


def _toc_files(entries):
    for entry in entries:
        if "file" in entry:
            yield entry["file"]
        for key in ("chapters", "sections", "parts"):
            yield from _toc_files(entry.get(key, []))


def test_toc_lists_every_chapter_and_only_existing_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = [toc["root"], *_toc_files(toc.get("parts", []) + toc.get("chapters", []))]
    for name in listed:
        assert (ROOT / f"{name}.md").exists(), f"_toc.yml lists {name} but {name}.md does not exist"
    on_disk = {str(p.relative_to(ROOT).with_suffix("")) for p in BOOK.glob("*.md")}
    assert on_disk <= set(listed), f"chapters missing from _toc.yml: {sorted(on_disk - set(listed))}"


def test_setup_cells_install_from_the_configured_repository():
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    for md in SOURCES:
        nb = jupytext.read(md)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        assert code, f"{md.name} has no code cells"
        setup = code[0]
        assert "ls.setup(" in setup, f"{md.name}: the first code cell must be the setup cell"
        assert f"git+{url}" in setup, f"{md.name}: setup cell must install from {url} (the _config.yml repository)"


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_conda_environment_has_the_same_pins_as_pip():
    pip_pins = _pins((ROOT / "requirements-pinned.txt").read_text().splitlines())
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip_section) == pip_pins
    assert "torch" in pip_pins and pip_pins["jupyter-book"].startswith("1.")
