"""What the installed package declares: version, changelog, license, index description, API.

These tests read the metadata of the installed distribution (``pip install -e .``
writes it for this checkout; CI also checks the installed wheel), so they see
what an index and a user see.
"""

from importlib import metadata
from pathlib import Path
import re

from packaging.version import Version

import gradient_ascent_jax as gax

ROOT = Path(__file__).resolve().parent.parent
DIST = "gradient_ascent_jax"
# A versioned release heading of Keep a Changelog: "## [1.2.3] - 2026-12-01".
RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", re.M)
# Markdown inline links and images, reference definitions, and HTML href/src.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)|^\s*\[[^\]]+\]:\s*(\S+)|(?:href|src)=[\"']([^\"']+)", re.M)


def link_targets(markdown: str) -> list[str]:
  return [next(group for group in match.groups() if group) for match in LINK.finditer(markdown)]


def relative_links(markdown: str) -> list[str]:
  """The link targets an index page cannot follow: those without a scheme."""
  return [
    target for target in link_targets(markdown) if not re.match(r"[a-z][a-z0-9+.-]*:", target)
  ]


def test_version_metadata_and_changelog_agree():
  text = (ROOT / "CHANGELOG.md").read_text()
  releases = RELEASE.findall(text)
  assert releases, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' heading"
  assert gax.__version__ == metadata.version(DIST)
  unreleased = text[text.index("## [Unreleased]") : RELEASE.search(text).start()]
  if re.search(r"^- ", unreleased, re.M):
    # Work not yet released: the next version's .dev0, above the last release, so that
    # a wheel built from main is not taken for it.
    version, last = Version(gax.__version__), Version(releases[0])
    assert version.is_devrelease and version > last and version.base_version != str(last)
  else:  # a release: the version of its section
    assert gax.__version__ == releases[0]


def test_changelog_keeps_an_unreleased_section_above_the_releases():
  text = (ROOT / "CHANGELOG.md").read_text()
  assert text.index("## [Unreleased]") < RELEASE.search(text).start()


def test_relative_links_are_found():
  page = (
    "[docs](docs/index.md) [site](https://example.org/x) ![plot](benchmarks/a.png)\n"
    '[ref]: guide/faq.md\n<img src="logo.png"> <a href="mailto:a@b.c">'
  )
  assert link_targets(page) == [
    "docs/index.md",
    "https://example.org/x",
    "benchmarks/a.png",
    "guide/faq.md",
    "logo.png",
    "mailto:a@b.c",
  ]
  assert relative_links(page) == ["docs/index.md", "benchmarks/a.png", "guide/faq.md", "logo.png"]


def test_index_description_has_no_dead_links():
  meta = metadata.metadata(DIST)
  description = meta.get_payload()
  assert meta["Description-Content-Type"] == "text/markdown"
  assert "gax.gradient_ascent" in description and "gax.maximize" in description
  assert relative_links(description) == []
  assert "SPEC" not in description


def test_license_is_declared_and_shipped():
  meta = metadata.metadata(DIST)
  assert meta["License-Expression"] == "Apache-2.0"
  assert meta.get_all("License-File") == ["LICENSE"]
  assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()


def test_public_names_are_exactly_all():
  public = {name for name in dir(gax) if not name.startswith("_")}
  assert public == set(gax.__all__)
  assert len(gax.__all__) == len(set(gax.__all__)) == 16
