"""Sphinx configuration of the shedder documentation (MyST Markdown, furo theme).

Build: ``sphinx-build -W -b html docs docs/_build/html`` (``tests/docs/test_docs.py`` does so).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "src"))  # autodoc reads this checkout, installed or not

from shedder import __version__  # noqa: E402

project = "shedder"
author = "The shedder developers"
copyright = "The shedder developers"
release = __version__
version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# DESIGN.md is the contributors' design record, read in the repository, not a user page.
exclude_patterns = ["_build", "DESIGN.md", ".*"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # httpx's transport docstrings are not ours (nor valid RST)
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"shedder {release}"
html_static_path: list[str] = []
