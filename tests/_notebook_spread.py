"""Measures how far a notebook's printed numbers move with the seed, the CPU ISA and threads.

The tolerances of tests/test_notebooks.py for rounding-sensitive outputs come from this:

  python -m tests._notebook_spread 05_adversarial_examples --seeds 0 1 2 --isa AVX2 SSE4_2

runs the notebook's code cells as one script (matplotlib's Agg backend, one CPU device)
once per configuration, the seed varied by rewriting the notebook's own seed expressions,
and prints, for every printed line, each configuration's numbers and their spread (max -
min) over the ISA caps and thread counts at the notebook's seed, and over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import re
import subprocess
import sys

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

# The seed expressions of each notebook: (as saved, with {s} for the varied seed).
# Seed 0 reproduces the saved notebook.
SEEDS = {
  "02_flax_classifier": [("nnx.Rngs(0)", "nnx.Rngs({s})")],
  "03_policy_gradient": [],
  "05_adversarial_examples": [
    ("nnx.Rngs(0)", "nnx.Rngs({s})"),
    ("jax.random.key(10 + i)", "jax.random.key(10 + i + 100 * {s})"),
    ("jax.random.key(20 + i)", "jax.random.key(20 + i + 100 * {s})"),
  ],
  "06_minimax_games": [
    ("train_gan(jax.random.key(0))", "train_gan(jax.random.key({s}))"),
    ("jax.random.key(1), (2000, 2)", "jax.random.key(1 + 1000 * {s}), (2000, 2)"),
  ],
  "08_feature_visualization": [],
}


def script(name: str, seed: int) -> str:
  notebook = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
  code = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
  for saved, varied in SEEDS.get(name, []):
    if saved not in code:
      raise SystemExit(f"{name}: seed expression {saved!r} not found; update SEEDS")
    code = code.replace(saved, varied.format(s=seed))
  if seed and not SEEDS.get(name):
    raise SystemExit(f"{name}: no seed expressions known; add them to SEEDS")
  return code


def run(name: str, seed: int, isa: str | None, cores: str | None) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if isa:
    env["XLA_FLAGS"] = f"--xla_cpu_max_isa={isa}"
  env.update(
    MPLBACKEND="Agg",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
  )
  command = [sys.executable, "-c", script(name, seed)]
  if cores:
    command = ["taskset", "-c", cores, *command]
  out = subprocess.run(
    command, env=env, cwd=ROOT / "notebooks", capture_output=True, text=True, check=False
  )
  if out.returncode:
    raise SystemExit(f"{name} seed={seed} isa={isa} cores={cores} failed:\n{out.stderr[-3000:]}")
  return out.stdout.splitlines()


def spread(runs: dict[str, list[str]]) -> list[str]:
  """One report line per printed line: the largest max - min of its numbers over the runs."""
  report = []
  for lines in zip(*runs.values()):
    columns = list(zip(*(map(float, NUMBER.findall(line)) for line in lines)))
    widest = max((max(c) - min(c) for c in columns), default=0.0)
    report.append(f"  spread {widest:.4g}: {lines[0][:90]}")
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("name")
  parser.add_argument("--seeds", type=int, nargs="*", default=[0])
  parser.add_argument(
    "--isa",
    nargs="*",
    default=["AVX2", "SSE4_2"],
    help="XLA CPU ISA caps, besides the CPU's own (no cap)",
  )
  parser.add_argument(
    "--cores", nargs="*", default=["0"], help="taskset core lists, besides all cores"
  )
  args = parser.parse_args()
  machine = {}
  for isa in [None, *args.isa]:
    for cores in [None, *args.cores]:
      label = f"isa={isa or 'native'} cores={cores or 'all'}"
      machine[label] = run(args.name, 0, isa, cores)
      print(label, *machine[label], sep="\n  ", flush=True)
  print("over ISA caps and cores at the notebook's seed:", *spread(machine), sep="\n")
  if len(args.seeds) > 1:
    seeded = {}
    for seed in args.seeds:
      seeded[seed] = (
        machine["isa=native cores=all"] if seed == 0 else run(args.name, seed, None, None)
      )
      print(f"seed={seed}", *seeded[seed], sep="\n  ", flush=True)
    print(f"over seeds {args.seeds}:", *spread(seeded), sep="\n")


if __name__ == "__main__":
  main()
