"""The demo command: the three original examples run and their objectives rise."""

import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from gradient_ascent_jax import _demo


def _run_demo(*args):
  result = subprocess.run(  # from outside the checkout: `-m` puts the cwd first on sys.path
    [sys.executable, "-m", "gradient_ascent_jax", *args],
    cwd=tempfile.gettempdir(),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  return result


@pytest.mark.slow  # runs the demo in a subprocess (8-13 s)
def test_demo_command_runs_all_three_examples_and_objectives_rise():
  result = _run_demo()
  assert result.returncode == 0, result.stderr
  out = result.stdout
  for name in ("basic", "clipping", "warmup-decay"):
    assert f"Example '{name}'" in out
  before = [float(x) for x in re.findall(r"before: ([-+0-9.e]+)", out)]
  after = [float(x) for x in re.findall(r"after:\s+([-+0-9.e]+)", out)]
  optimized = [
    float(x)
    for x in re.findall(r"Optimized Value \(model\(1\.0\) = -objective\): ([-+0-9.e]+)", out)
  ]
  assert len(before) == len(after) == len(optimized) == 3
  assert all(a > b for a, b in zip(after, before))
  # The objective is -model(1.0), so the optimized value is its negative.
  assert all(abs(o + a) < 1e-4 * max(1.0, abs(a)) for o, a in zip(optimized, after))
  # The progress log is visible: 10 records per example at the default interval,
  # each with the objective, which rises from record to record in every example.
  logged = re.findall(r"\[gradient_ascent_jax\] step (\d+): objective ([-+0-9.e]+),", out)
  assert len(logged) == 30
  objectives = np.reshape([float(v) for _, v in logged], (3, 10))
  for first, example in zip(before, objectives):
    assert first < example[0] < example[-1]
  assert "WARNING" not in out and "keeps falling" not in out
  assert "DID NOT RISE" not in out


@pytest.mark.slow  # runs the demo in a subprocess (8-13 s)
def test_demo_flags():
  result = _run_demo(
    "--example", "clipping", "--steps", "7", "--logging-interval", "3", "--learning-rate", "0.001"
  )
  assert result.returncode == 0, result.stderr
  steps = re.findall(
    r"\[gradient_ascent_jax\] step (\d+): objective [^,]+, learning rate ([0-9.e-]+)", result.stdout
  )
  assert [int(s) for s, _ in steps] == [3, 6]
  assert all(float(lr) == pytest.approx(0.001) for _, lr in steps)
  assert "Example 'basic'" not in result.stdout
  assert "(7 steps)" in result.stdout


@pytest.mark.slow  # runs the demo in a subprocess (8-13 s)
def test_demo_logging_off():
  result = _run_demo("--example", "basic", "--steps", "5", "--logging-interval", "0")
  assert result.returncode == 0, result.stderr
  assert "[gradient_ascent_jax]" not in result.stdout


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--logging-interval", "-5"], "--logging-interval must be >= 0"),
    (["--learning-rate", "-1"], "--learning-rate must be a finite number >= 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number >= 0"),
  ],
)
def test_demo_refuses_bad_flags_with_a_usage_message(flags, message, capsys):
  # As --steps 0 was: argparse's usage and exit status 2, before any example runs
  # (a negative rate or interval raised a traceback after the first header).
  with pytest.raises(SystemExit) as exit_info:
    _demo.main(["--example", "basic", *flags])
  assert exit_info.value.code == 2
  out, err = capsys.readouterr()
  assert message in err and "usage:" in err
  assert "Example" not in out


@pytest.mark.parametrize("name", list(_demo.EXAMPLES))
def test_each_example_objective_rises_in_process(name):
  result = _demo.run_example(_demo.EXAMPLES[name], steps=100, logging_interval=None)
  assert result.after > result.before
  # The recorded history is increasing on average over the run.
  assert result.history[-1] > result.history[0]


def test_warmup_decay_example_uses_its_settings():
  options = _demo.EXAMPLES["warmup-decay"].options
  assert options == {"clip_value": 1.0, "lr_decay": 0.95, "warmup_steps": 50}
  assert _demo.EXAMPLES["clipping"].options == {"clip_value": 1.0}
  assert _demo.EXAMPLES["basic"].options == {}
