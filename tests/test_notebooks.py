"""Executes every notebook in notebooks/ and checks what it prints.

Each notebook runs in a fresh ipykernel kernel started with THIS interpreter
(a kernel spec written for the test, so a user-level ``python3`` spec pointing
elsewhere cannot interfere) with this checkout first on ``PYTHONPATH``, so the
notebooks test the code next to them, not an installed copy. The saved
notebooks are not modified.
"""

import json
import os
from pathlib import Path
import re
import sys

from nbclient import NotebookClient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300
KERNEL = "gradient-ascent-jax-test"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A Jupyter data dir holding one kernel spec: ipykernel on sys.executable."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec / "kernel.json").write_text(
      json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
  )
  return root


def execute(name, monkeypatch, kernel_dir):
  """Runs the notebook; returns its stream text and how many images it drew."""
  monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      cell.outputs = []  # nothing left over from the saved run can satisfy a check
  NotebookClient(
      notebook,
      timeout=CELL_TIMEOUT_S,
      kernel_name=KERNEL,
      resources={"metadata": {"path": str(NOTEBOOKS)}},
  ).execute()
  text, images = [], 0
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      assert output.output_type != "error", f"{name}: {output.ename}: {output.evalue}"
      if output.output_type == "stream" and output.name == "stdout":
        text.append(output.text)
      images += "image/png" in output.get("data", {})
  return "".join(text), images


def number(pattern, text):
  found = re.findall(pattern, text, re.M)
  assert len(found) == 1, f"expected one match of {pattern!r} in:\n{text}"
  return float(found[0])


def test_all_notebooks_are_tested():
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == [
      "01_quickstart",
      "02_flax_classifier",
      "03_policy_gradient",
      "04_sweep",
  ]


def test_quickstart(monkeypatch, kernel_dir):
  text, images = execute("01_quickstart", monkeypatch, kernel_dir)
  results = re.findall(r"^([\w-]+): objective ([-+][\d.]+) -> ([-+][\d.]+)", text, re.M)
  assert [name for name, _, _ in results] == ["basic", "clipping", "warmup-decay"]
  for name, before, after in results:
    assert float(after) > float(before), name
  # The progress log of the 100-step run with logging_interval=25: one record per step.
  assert re.findall(r"\[gradient_ascent_jax\] step (\d+):", text) == ["25", "50", "75", "100"]
  assert images >= 1


def test_flax_classifier(monkeypatch, kernel_dir):
  text, images = execute("02_flax_classifier", monkeypatch, kernel_dir)
  for name in ("gradient_ascent", r"maximize\(adam\)"):
    start = number(rf"^{name}: train log-likelihood ([-\d.]+) ->", text)
    end = number(rf"^{name}: train log-likelihood [-\d.]+ -> ([-\d.]+)", text)
    accuracy = number(rf"^{name}: .*test accuracy ([\d.]+)", text)
    assert start < -2.0 < -0.2 < end  # from about log(1/10) to near 0
    assert accuracy >= 0.9, f"{name}: test accuracy {accuracy} (chance is 0.1)"
  assert images >= 1


def test_policy_gradient(monkeypatch, kernel_dir):
  text, images = execute("03_policy_gradient", monkeypatch, kernel_dir)
  random_return = number(r"random policy, mean return over 100 episodes: ([\d.]+)", text)
  mean_return = number(r"mean return over 100 evaluation episodes: ([\d.]+)", text)
  assert random_return < 50
  assert 150 <= mean_return <= 500
  assert images >= 1


def test_sweep(monkeypatch, kernel_dir):
  text, images = execute("04_sweep", monkeypatch, kernel_dir)
  assert number(r"learning rates swept: (\d+)", text) >= 16
  assert number(r"traces: (\d+)", text) == 1  # one compiled program for the whole sweep
  best = number(r"final objective ([-+\d.e]+)", text)
  assert -0.1 < best <= 0.0  # the maximum of the negated Rosenbrock function is 0
  assert images >= 1


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_saved_notebooks_are_executed_and_small(path):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(cell.execution_count for cell in code), "save the notebook executed"
  assert not any(o.output_type == "error" for cell in code for o in cell.outputs)
  assert path.stat().st_size < 300_000
