"""Runs every Python block of README.md and docs/**/*.md as a user would paste it.

Each ```python block runs as its own script in a fresh interpreter (importing
the installed gradient_ascent_jax, without the test suite's settings such as
its 8 fake devices), and must exit cleanly. A block claims output in two ways, and
the claim is checked against what it really prints (stdout and stderr, where
the log records go):

- a ```text block right after it (no other code block between): its lines
  must appear in the output, in that order;
- a ``# prints: ...`` comment on a line: that text must appear as a line of
  the output, in the order of the comments.

Numbers in a claimed line match to a relative 1e-3 (absolute 1e-8), so a
printed float that differs in its last digits on another CPU still matches;
everything else must match exactly.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
from pathlib import Path
import re
import subprocess
import sys

import pytest

import gradient_ascent_jax as gax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATED = (DOCS / "_build", DOCS / "notebooks")  # build output, copied notebooks
TIMEOUT_S = 180
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def markdown_files() -> list[Path]:
  files = [ROOT / "README.md"]
  for path in sorted(DOCS.rglob("*.md")):
    if not any(path.is_relative_to(folder) for folder in GENERATED):
      files.append(path)
  return files


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
  """(language, line number of the opening fence, body) of every fenced block."""
  blocks, lines, i = [], path.read_text().splitlines(), 0
  while i < len(lines):
    opening = FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    fence, language, start, body = opening.group(1), opening.group(2), i + 1, []
    i += 1
    while i < len(lines) and lines[i].rstrip() != fence:
      body.append(lines[i])
      i += 1
    assert i < len(lines), f"{path}:{start}: unclosed code fence"
    blocks.append((language, start, "\n".join(body) + "\n"))
    i += 1
  return blocks


def snippets() -> list:
  """One pytest param per python block: (path, line, code, claimed output lines)."""
  params = []
  for path in markdown_files():
    blocks = fenced_blocks(path)
    for index, (language, line, code) in enumerate(blocks):
      if language != "python":
        continue
      claimed = [m.group(1) for m in map(PRINTS.search, code.splitlines()) if m]
      following = blocks[index + 1] if index + 1 < len(blocks) else None
      if following and following[0] == "text":
        claimed += [text for text in following[2].splitlines() if text.strip()]
      rel = path.relative_to(ROOT)
      params.append(pytest.param(rel, line, code, claimed, id=f"{rel}:{line}"))
  return params


def numbers_match(claimed: str, actual: str) -> bool:
  a, b = float(claimed), float(actual)
  return math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-8)


def line_matches(claimed: str, actual: str) -> bool:
  claimed, actual = claimed.strip(), actual.strip()
  if NUMBER.split(claimed) != NUMBER.split(actual):
    return False
  pairs = zip(NUMBER.findall(claimed), NUMBER.findall(actual), strict=True)
  return all(numbers_match(c, a) for c, a in pairs)


def test_every_page_is_collected():
  names = {str(p.relative_to(ROOT)) for p in markdown_files()}
  assert {"README.md", "docs/index.md", "docs/guide/getting_started.md"} <= names
  assert not any(name.startswith(("docs/_build", "docs/notebooks")) for name in names)


def test_readme_links_only_files_in_the_repository():
  readme = (ROOT / "README.md").read_text()
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
  local = [t for t in targets if not re.match(r"[a-z]+:", t)]
  assert local, "expected links into docs/"
  missing = [t for t in local if not (ROOT / t).exists()]
  assert not missing, f"README.md links to files that are not in the repository: {missing}"
  assert "SPEC" not in readme


def test_readme_api_table_lists_every_public_callable_with_its_signature():
  # The README's "Public API" table: one row per public function or class (the state
  # types are named in their stage's row), its parameters as the signature has them:
  # the names, in order, the keyword-only marker, and a default where the row shows one.
  readme = (ROOT / "README.md").read_text()
  table = readme.split("## Public API", 1)[1].split("\n## ", 1)[0]
  rows = dict(re.findall(r"^\| `(\w+)\(([^`]*)\)` \|", table, flags=re.MULTILINE))
  callables = [
    name
    for name in gax.__all__
    if not (isinstance(getattr(gax, name), type) and issubclass(getattr(gax, name), tuple))
  ]
  assert sorted(rows) == sorted(callables)
  for name, shown in rows.items():
    signature = inspect.signature(getattr(gax, name))
    expected = []
    for parameter in signature.parameters.values():
      if parameter.kind is parameter.KEYWORD_ONLY and "*" not in expected:
        expected.append("*")
      expected.append(parameter.name)
    params = [p.strip() for p in shown.split(",") if p.strip()]
    assert [p.split("=")[0] for p in params] == expected, name
    for p in params:
      if "=" in p:
        key, default = p.split("=", 1)
        assert ast.literal_eval(default) == signature.parameters[key].default, (name, key)


def test_hyperparameters_page_has_a_row_for_every_argument_of_gradient_ascent():
  page = (ROOT / "docs" / "guide" / "hyperparameters.md").read_text()
  rows = set(re.findall(r"^\| `(\w+)` \| `", page, flags=re.MULTILINE))
  assert set(inspect.signature(gax.gradient_ascent).parameters) <= rows


def test_claims_are_checked_with_tolerance_only_on_numbers():
  assert line_matches("gradient norm 8.25906e-07", "gradient norm 8.259e-07")
  assert not line_matches("gradient norm 8.25906e-07", "gradient norm 9.1e-07")
  assert not line_matches("step 100: rate", "step 100: rates")
  assert not line_matches("step 100", "step 101")


def run_snippet(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
  """``code`` run as a user's script: its stdout and stderr together."""
  env = dict(os.environ)
  # The suite's 8 fake devices are not the user's setup; other XLA flags (an ISA cap) reach it.
  env["XLA_FLAGS"] = " ".join(
    flag
    for flag in env.get("XLA_FLAGS", "").split()
    if not flag.startswith("--xla_force_host_platform_device_count")
  )
  env["PYTHONUNBUFFERED"] = "1"  # keep prints and log records in order
  script = tmp_path / "snippet.py"
  script.write_text(code)
  return subprocess.run(
    [sys.executable, str(script)],
    cwd=tmp_path,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=TIMEOUT_S,
  )


@pytest.mark.slow  # each block runs in a fresh Python process (up to 27 s)
@pytest.mark.parametrize(("path", "line", "code", "claimed"), snippets())
def test_snippet_runs_and_prints_what_it_claims(path, line, code, claimed, tmp_path):
  result = run_snippet(code, tmp_path)
  where = f"{path}:{line}"
  assert result.returncode == 0, f"{where} failed:\n{result.stdout}"
  output = result.stdout.splitlines()
  position = 0
  for expected in claimed:
    while position < len(output) and not line_matches(expected, output[position]):
      position += 1
    assert position < len(output), (
      f"{where} claims it prints {expected!r} (in this order), but printed:\n{result.stdout}"
    )
    position += 1


def test_every_test_the_docs_name_exists():
  # The docs back their claims ("What happens when…" and others) with named
  # tests; a renamed or deleted test must not leave a dangling reference.
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
  named = set()
  for page in pages:
    if "_build" in page.parts or "notebooks" in page.parts:
      continue
    named |= set(re.findall(r"(tests/\w+\.py)::(\w+)", page.read_text()))
  assert len(named) > 50  # the "What happens when…" page alone names more
  missing = sorted(
    f"{path}::{name}"
    for path, name in named
    if not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.M)
  )
  assert not missing, f"the docs name tests that do not exist: {missing}"


@pytest.mark.slow  # the three layouts: 10 s or more on 2 cores
@pytest.mark.parametrize(
  "logging", ["logging_interval=10", 'logging_interval=10, logging_emit="state"']
)
def test_multi_device_layouts_run_with_logging_on(logging, tmp_path):
  # The guide's three layouts with logging on: its ZeRO-1 rule replicates the state
  # path's record (uint32[19] does not divide over 8 devices), and it finds the
  # velocity wherever the logging stage puts it.
  path = DOCS / "guide" / "multi_device.md"
  (code,) = [body for _, _, body in fenced_blocks(path) if "def train(layout" in body]
  assert code.count("logging_interval=None") == 1
  result = run_snippet(code.replace("logging_interval=None", logging), tmp_path)
  assert result.returncode == 0, result.stdout
  trained = [line.split()[0] for line in result.stdout.splitlines() if "-2.167 -> -0.859" in line]
  assert trained == ["replicated", "fsdp", "zero1"]
