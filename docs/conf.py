"""Sphinx configuration: API pages from the docstrings, guides and notebooks.

Build from the repository root::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

The build needs no network: no intersphinx inventories, no remote assets.
"""

from pathlib import Path
import re
import shutil
import sys

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
import sphinx.util.inspect

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy

import gradient_ascent_jax  # noqa: E402

# The notebooks live in notebooks/ (tested there). Sphinx reads sources only
# under docs/, so they are copied into the git-ignored docs/notebooks/ at
# every build, by glob: a new notebook appears on the site without edits here.
_NOTEBOOKS = DOCS / "notebooks"
shutil.rmtree(_NOTEBOOKS, ignore_errors=True)
_NOTEBOOKS.mkdir()
for _notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
  shutil.copy2(_notebook, _NOTEBOOKS / _notebook.name)

project = "gradient_ascent_jax"
author = "The gradient_ascent_jax authors"
copyright = "2026, The gradient_ascent_jax authors"  # noqa: A001
release = version = gradient_ascent_jax.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]
# pypi.md is the package index's description (pyproject's readme), not a page.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "pypi.md"]

# The notebooks are shown with their committed outputs; tests/test_notebooks.py
# executes every one of them against the current library.
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_default_options = {}  # the State fields come from each docstring's Attributes
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Show the annotations as written (the module uses postponed annotations), not
# expanded: `optax.ScalarOrSchedule` instead of a union of a dozen NumPy types.
autodoc_type_aliases = {
  name: name
  for name in (
    "optax.ScalarOrSchedule",
    "optax.Schedule",
    "optax.Updates",
    "optax.Params",
    "jax.typing.ArrayLike",
    "jax.typing.DTypeLike",
    "chex.Array",
  )
}
# Inside a union (`jax.typing.DTypeLike | None`) Sphinx prints an alias by its
# repr, "TypeAliasForwardRef('jax.typing.DTypeLike')": print its name.
sphinx.util.inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The State fields' types show once, as the constructor's parameters (through
# autodoc_type_aliases); napoleon would repeat them expanded under Attributes.
napoleon_attr_annotations = False

# Docstring literal blocks (``::``) hold equations and pseudo-code, not Python.
highlight_language = "none"

html_theme = "sphinx_book_theme"
html_title = "gradient_ascent_jax"
html_theme_options = {
  "show_toc_level": 2,
  "home_page_in_toc": True,
  "use_download_button": False,
  "use_fullscreen_button": False,
  "navigation_with_keys": False,
  "navbar_persistent": [],  # one search field (the sidebar's), not two
}
html_static_path = ["_static"]
html_css_files = ["tables.css"]  # tables and code that fit the column: see the file


class _BreakableLiteralsInTables(SphinxPostTransform):
  """Puts a <wbr> after each / . _ : , ( of a literal in a table cell.

  A test path such as tests/test_validation.py::test_name is one word to the
  browser: the column either grows past the page or the path breaks mid-word.
  With a break opportunity after each separator it wraps where a reader expects.
  """

  default_priority = 900
  formats = ("html",)

  def run(self, **kwargs):
    for table in self.document.findall(nodes.table):
      for literal in list(table.findall(nodes.literal)):
        pieces = []
        for text in literal.findall(nodes.Text):
          for part in re.split(r"(?<=[/._:,(])(?=[^/._:,(])", str(text)):
            if pieces:
              pieces.append(nodes.raw("", "<wbr>", format="html"))
            pieces.append(nodes.Text(part))
        literal.children = []
        literal.extend(pieces)


def setup(app):
  app.add_post_transform(_BreakableLiteralsInTables)


html_show_sourcelink = False
