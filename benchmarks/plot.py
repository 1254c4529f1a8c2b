"""Log-log plot of step time against parameter count, one line per peer.

Reads the JSON written by ``python -m benchmarks.step_time --json FILE`` and
writes a PNG with one panel per configuration (single-leaf cases only).

  python -m benchmarks.step_time --json benchmarks/step_time.json
  python -m benchmarks.plot benchmarks/step_time.json -o benchmarks/step_time.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLES = {
  "gax": ("C0", "o", 2.5),
  "optax chain": ("C1", "s", 1.5),
  "hand-fused": ("C2", "^", 1.5),
  "maximize(adam)": ("C4", "v", 1.0),
  "torch foreach": ("C3", "D", 1.0),
  "torch for-loop": ("C5", "x", 1.0),
  "probe": ("0.4", ".", 1.0),
}


def plot(rows: list[dict], title: str, output: str) -> list[str]:
  """Writes the PNG; returns the peers drawn."""
  configs = list(dict.fromkeys(row["config"] for row in rows))
  fig, axes = plt.subplots(
    1, len(configs), figsize=(5.5 * len(configs), 4.2), squeeze=False, sharey=True
  )
  drawn = []
  for ax, config in zip(axes[0], configs, strict=True):
    for peer, (color, marker, width) in STYLES.items():
      points = sorted(
        (row["params"], row["seconds"])
        for row in rows
        if row["config"] == config
        and row["peer"] == peer
        and row["leaves"] == 1
        and row["seconds"] is not None
      )
      if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=color, marker=marker, linewidth=width, label=peer)
        drawn.append(peer)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (one float32 leaf)")
    ax.set_title(config, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("median time per step (s)")
  handles = {}
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
      handles.setdefault(label, handle)
  axes[0][0].legend(handles.values(), handles.keys(), fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(output, dpi=80)
  plt.close(fig)
  return sorted(set(drawn))


def main(argv: Sequence[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("input", help="JSON from benchmarks.step_time --json")
  parser.add_argument("-o", "--output", default="benchmarks/step_time.png")
  args = parser.parse_args(argv)
  with open(args.input) as f:
    data = json.load(f)
  env = data["environment"]
  title = f"Step time, {env['machine']} ({env['device']}), {env['date']}"
  peers = plot(data["rows"], title, args.output)
  print(f"wrote {args.output}: {', '.join(peers)}")
  return peers


if __name__ == "__main__":
  main()
