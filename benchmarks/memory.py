"""Peak memory of the compiled step, and bytes of optimizer state.

Peak memory is XLA's own figure for the compiled, donated step
(``jax.jit(step).lower(...).compile().memory_analysis()``:
``peak_memory_in_bytes``), shown with a conservative bound, arguments +
outputs - donated aliases + temporaries, which the comparison uses.
State bytes are the optimizer state's
leaves, with float32 params, for the default and ``accumulator_dtype=bfloat16``.

Run ``python -m benchmarks.memory --help`` for the options.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import sys

import jax
import jax.numpy as jnp

from benchmarks import _common
import gradient_ascent_jax as gax


def gax_bf16(config: _common.Config):
  fields = dataclasses.asdict(config)
  del fields["name"]
  fields["logging_interval"] = None
  return gax.gradient_ascent(**fields, accumulator_dtype=jnp.bfloat16)


GAX, GAX_BF16, OPTAX = "gax", "gax, bfloat16 state", "optax chain"
PEERS = {
  GAX: _common.gradient_ascent,
  GAX_BF16: gax_bf16,
  OPTAX: _common.optax_chain,
  "maximize(adam)": _common.maximize_adam,
}


# Tolerance against gax.gradient_ascent, checked before measuring: bfloat16
# moments round to 2**-9; maximize(adam) is another optimizer and must only ascend.
CHECK_RTOLS = {GAX: 1e-5, GAX_BF16: 2e-2, OPTAX: 1e-5, "maximize(adam)": None}


def measure(config, num_params, num_leaves) -> list[dict]:
  _common.check_transforms(
    {peer: make_tx(config) for peer, make_tx in PEERS.items()},
    config,
    min(num_leaves, 10),
    CHECK_RTOLS,
  )
  size = num_params // num_leaves
  params = [jax.ShapeDtypeStruct((size,), jnp.float32) for _ in range(num_leaves)]
  rows = []
  for peer, make_tx in PEERS.items():
    # Shapes only: nothing is allocated, so 1e7-parameter cases cost nothing.
    tx = make_tx(config)
    state = jax.eval_shape(tx.init, params)
    stats = _common.jitted_step(tx).lower(params, state, params).compile().memory_analysis()
    rows.append(
      {
        "config": config.name,
        "params": size * num_leaves,
        "leaves": num_leaves,
        "peer": peer,
        "xla_peak_bytes": stats.peak_memory_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "peak_bytes": (
          stats.argument_size_in_bytes
          + stats.output_size_in_bytes
          - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes
        ),
        "state_bytes": sum(jnp.dtype(s.dtype).itemsize * s.size for s in jax.tree.leaves(state)),
      }
    )
  by_peer = {row["peer"]: row for row in rows}
  for row in rows:
    row["peak_vs_optax"] = row["peak_bytes"] / by_peer[OPTAX]["peak_bytes"]
    row["peak_minus_optax"] = row["peak_bytes"] - by_peer[OPTAX]["peak_bytes"]
    row["state_vs_gax"] = row["state_bytes"] / by_peer[GAX]["state_bytes"]
  return rows


def mib(num_bytes: int, sign: str = "") -> str:
  if abs(num_bytes) < 2**10:
    return f"{num_bytes:{sign}d} B"
  return f"{num_bytes / 2**20:{sign}.2f} MiB"


def table(rows: list[dict]) -> str:
  headers = [
    "config",
    "params",
    "leaves",
    "peer",
    "XLA peak",
    "temporaries",
    "args+outs-aliased+temps",
    "vs optax chain",
    "minus optax chain",
    "state",
    "state vs gax",
  ]
  body = [
    [
      row["config"],
      f"{row['params']:.0e}",
      row["leaves"],
      row["peer"],
      mib(row["xla_peak_bytes"]),
      mib(row["temp_bytes"]),
      mib(row["peak_bytes"]),
      _common.fmt_ratio(row["peak_vs_optax"]),
      mib(row["peak_minus_optax"], "+"),
      mib(row["state_bytes"]),
      _common.fmt_ratio(row["state_vs_gax"]),
    ]
    for row in rows
  ]
  return _common.markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = _common.base_parser(__doc__.splitlines()[0], timed=False)
  parser.add_argument(
    "--cases", default="1e6:1,1e7:1,1e7:100", help="PARAMS:LEAVES cases, comma-separated"
  )
  parser.add_argument(
    "--configs", default="default,full", help=f"comma-separated subset of {sorted(_common.CONFIGS)}"
  )
  args = parser.parse_args(argv)
  if args.smoke:
    _common.smoke_defaults(parser, args, cases="1e4:1")
  _common.print_header("Memory", argv if argv is not None else sys.argv[1:])
  rows = []
  for name in args.configs.split(","):
    for item in args.cases.split(","):
      params, leaves = item.split(":")
      rows += measure(_common.CONFIGS[name], int(float(params)), int(leaves))
  print(table(rows) + "\n")
  _common.write_json(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
