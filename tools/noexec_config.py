"""Write a copy of the book's _config.yml with notebook execution switched off.

Usage: python tools/noexec_config.py SOURCE_CONFIG TARGET_CONFIG

Used by `make check-book`: the markup and table of contents are checked with warnings as errors,
without executing any chapter (the notebooks are executed separately, under nbval).
"""
import pathlib
import sys

import yaml

source, target = map(pathlib.Path, sys.argv[1:3])
config = yaml.safe_load(source.read_text())
config.setdefault("execute", {})["execute_notebooks"] = "off"
target.parent.mkdir(parents=True, exist_ok=True)
target.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
print(f"wrote {target} (execute_notebooks: off)")
