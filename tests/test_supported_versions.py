"""The versions the docs call supported are the ones pyproject.toml declares and CI tests."""

from pathlib import Path
import re
import tomllib

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide" / "getting_started.md"


def declared_floors():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  floors = {"Python": re.fullmatch(r">=(3\.\d+)", project["requires-python"])[1]}
  for dependency in project["dependencies"]:
    name, floor = re.fullmatch(r"([\w.-]+)>=([\d.]+)(?:,!=[\d.]+)*", dependency).groups()
    floors[name] = floor
  return floors


def declared_exclusions():
  dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  return {
    (re.match(r"[\w.-]+", dependency)[0], excluded)
    for dependency in dependencies
    for excluded in re.findall(r"!=([\d.]+)", dependency)
  }


def documented_floors():
  section = GUIDE.read_text().split("## Supported versions", 1)[1].split("\n## ", 1)[0]
  floors = {}
  for names, floor in re.findall(r"^\| ([\w.,\s]+?) \| ([\d.]+) \|", section, re.M):
    floors.update({name.strip(): floor for name in names.split(",")})
  return floors


def test_docs_state_the_declared_floors():
  assert documented_floors() == declared_floors()


def test_ci_tests_the_documented_pythons():
  script = (ROOT / ".ci" / "versions").read_text()
  assert "pyproject.toml" in script  # the lowest job installs the floors it declares
  newest = re.search(r"^\| Python \| [\d.]+ \| ([\d.]+) \|", GUIDE.read_text(), re.M)[1]
  assert f"python_of {newest})" in script


def test_optax_release_that_jax_0_10_cannot_import_is_excluded():
  # optax 0.2.7 sets jax_pmap_shmap_merge, an option jax 0.10 removed: import fails.
  assert ("optax", "0.2.7") in declared_exclusions()


def test_docs_state_the_declared_exclusions():
  section = GUIDE.read_text().split("## Supported versions", 1)[1].split("\n## ", 1)[0]
  for name, excluded in declared_exclusions():
    assert f"{name} {excluded}" in section and f"!={excluded}" in section
