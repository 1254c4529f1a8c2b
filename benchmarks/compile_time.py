"""Trace + lower and compile time of one jitted step, by number of leaves.

Every repeat builds a fresh optimizer and a fresh ``jax.jit`` of a fresh step
function, and clears JAX's caches (``jax.clear_caches()``) before it traces, so
nothing is served from a cache: not the trace of the library's per-leaf steps
(jitted, shared by the leaves of one shape and dtype), nor those of the
``jax.numpy`` functions the Optax chain calls; peers are measured round-robin.
The leaves are all of one shape by default; ``--shapes N`` gives them N shapes
(sizes ``leaf_size`` to ``leaf_size + N - 1``), for the case where few leaves
share one.
Peers: ``gax`` with progress logging every 10 steps, ``gax`` with logging off
(the default), the equivalent Optax chain (which has no logging), and that
chain behind ``optax.clip_by_global_norm``, which computes a global norm too
(one reduction per leaf; the progress log reduces the leaves of one shape and
layout in blocks of 100, each block once).
A second table sets logging on against off, per number of leaves; for many
small leaves (where the cost of a per-leaf norm shows) run, for example,
``--leaves 1000,3000,5000 --leaf-size 2``.

``--mesh auto`` (or ``explicit``) traces and compiles under ``jax.set_mesh`` of a
2x4 mesh of that axis type, each leaf an ``(8, leaf_size / 8)`` array split
alternately by rows and by columns, so that leaves of one shape lie in two
layouts. It needs 8 devices: on a CPU, set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before running.

Run ``python -m benchmarks.compile_time --help`` for the options.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import _common

GAX_LOG, GAX_OFF, OPTAX = "gax (logging every 10)", "gax (logging off)", "optax chain"
OPTAX_NORM = "optax chain + clip_by_global_norm"
PEERS = {
  GAX_LOG: lambda config: _common.gradient_ascent(config, logging_interval=10),
  GAX_OFF: lambda config: _common.gradient_ascent(config, logging_interval=None),
  OPTAX: _common.optax_chain,
  OPTAX_NORM: lambda config: optax.chain(
    optax.clip_by_global_norm(1e6), _common.optax_chain(config)
  ),
}


def lower_and_compile(make_tx, config, params) -> tuple[float, float]:
  """Seconds to trace + lower and to compile a brand-new step function."""
  tx = make_tx(config)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jax.clear_caches()
  start = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
  middle = time.perf_counter()
  lowered.compile()
  return middle - start, time.perf_counter() - middle


def mesh_and_params(kind: str, num_leaves: int, leaf_size: int):
  """A 2x4 mesh of ``kind`` axes and leaves split alternately by rows and columns."""
  if jax.device_count() < 8:
    raise SystemExit(
      f"--mesh needs 8 devices, found {jax.device_count()}: on a CPU set "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8 before Python starts."
    )
  if leaf_size % 32:
    raise SystemExit(f"--mesh needs a --leaf-size that is a multiple of 32, got {leaf_size}.")
  axis_type = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type[kind],) * 2)
  specs = (jax.sharding.PartitionSpec(None, "model"), jax.sharding.PartitionSpec("model", None))
  params = [
    jax.device_put(leaf.reshape(8, -1), jax.sharding.NamedSharding(mesh, specs[i % 2]))
    for i, leaf in enumerate(_common.make_params(num_leaves * leaf_size, num_leaves))
  ]
  return mesh, params


def leaves_of_shapes(num_leaves: int, leaf_size: int, shapes: int) -> list[jax.Array]:
  """``num_leaves`` float32 1-D leaves of ``shapes`` sizes, ``leaf_size`` upward."""
  return [jnp.ones(leaf_size + i % shapes, jnp.float32) for i in range(num_leaves)]


def measure(
  config,
  num_leaves,
  leaf_size,
  repeats,
  peers=tuple(PEERS),
  mesh_kind: str | None = None,
  shapes: int = 1,
) -> list[dict]:
  # Every peer must compute the steps of gax.gradient_ascent before it is timed.
  # The math of one leaf does not depend on how many there are, and checking
  # at full size would compile every peer a second time.
  _common.check_transforms(
    {peer: PEERS[peer](config) for peer in peers},
    config,
    min(num_leaves, 10),
    dict.fromkeys(peers, 1e-5),
  )
  if mesh_kind is None:
    mesh, params = None, leaves_of_shapes(num_leaves, leaf_size, shapes)
  else:
    mesh, params = mesh_and_params(mesh_kind, num_leaves, leaf_size)
  samples = {peer: [] for peer in peers}
  for _ in range(repeats):
    for peer in peers:
      make_tx = PEERS[peer]
      with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        samples[peer].append(lower_and_compile(make_tx, config, params))
  medians = {}
  for peer, pairs in samples.items():
    lower = statistics.median(p[0] for p in pairs)
    compile_ = statistics.median(p[1] for p in pairs)
    total = statistics.median(p[0] + p[1] for p in pairs)
    medians[peer] = (lower, compile_, total)
  return [
    {
      "config": config.name,
      "leaves": num_leaves,
      "peer": peer,
      "lower_s": lower,
      "compile_s": compile_,
      "total_s": total,
      "shapes": shapes,
      "lower_vs_optax": lower / medians[OPTAX][0],
      "vs_optax": total / medians[OPTAX][2],
    }
    for peer, (lower, compile_, total) in medians.items()
  ]


def table(rows: list[dict]) -> str:
  headers = [
    "config",
    "leaves",
    "shapes",
    "peer",
    "trace+lower",
    "vs optax chain",
    "compile",
    "total",
    "vs optax chain",
  ]
  body = [
    [
      row["config"],
      row["leaves"],
      row["shapes"],
      row["peer"],
      _common.fmt_time(row["lower_s"]),
      _common.fmt_ratio(row["lower_vs_optax"]),
      _common.fmt_time(row["compile_s"]),
      _common.fmt_time(row["total_s"]),
      _common.fmt_ratio(row["vs_optax"]),
    ]
    for row in rows
  ]
  return _common.markdown_table(headers, body)


def logging_table(rows: list[dict]) -> str:
  """Logging on against off (and the per-leaf global norm of Optax), per size."""
  totals = {(row["config"], row["leaves"], row["peer"]): row["total_s"] for row in rows}
  headers = ["config", "leaves", "logging off", "logging on", "on / off", OPTAX_NORM]
  body = []
  for config, leaves in dict.fromkeys((row["config"], row["leaves"]) for row in rows):
    off, on = totals.get((config, leaves, GAX_OFF)), totals.get((config, leaves, GAX_LOG))
    if off is None or on is None:
      continue
    norm = totals.get((config, leaves, OPTAX_NORM))
    norm = "not run" if norm is None else _common.fmt_time(norm)
    body.append(
      [
        config,
        leaves,
        _common.fmt_time(off),
        _common.fmt_time(on),
        _common.fmt_ratio(on / off),
        norm,
      ]
    )
  return _common.markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = _common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--leaves", default="10,100,1000", help="leaf counts, comma-separated")
  parser.add_argument("--leaf-size", type=int, default=1000, help="parameters per leaf")
  parser.add_argument(
    "--shapes",
    type=int,
    default=1,
    help="number of distinct leaf shapes (sizes leaf-size, leaf-size + 1, ...); "
    "ignored with --mesh",
  )
  parser.add_argument(
    "--peers",
    default=",".join(PEERS),
    help=f"comma-separated subset of {list(PEERS)}; the optax chain, the "
    "reference of the ratios, is always timed",
  )
  parser.add_argument(
    "--mesh",
    choices=["auto", "explicit"],
    default=None,
    help="compile for leaves sharded on a 2x4 mesh of these axes (needs 8 "
    "devices; see the module docstring)",
  )
  parser.add_argument(
    "--configs", default="default", help=f"comma-separated subset of {sorted(_common.CONFIGS)}"
  )
  args = parser.parse_args(argv)
  if args.smoke:  # with --mesh, the smallest leaf that splits over the 2x4 mesh
    _common.smoke_defaults(parser, args, leaves="10", leaf_size=32 if args.mesh else 10)
  repeats = args.repeats or (2 if args.smoke else 3)
  _common.print_header("Compile time", argv if argv is not None else sys.argv[1:])
  rows = []
  for name in args.configs.split(","):
    for num_leaves in _common.parse_counts(args.leaves):
      rows += measure(
        _common.CONFIGS[name],
        num_leaves,
        args.leaf_size,
        repeats,
        tuple(peer for peer in PEERS if peer in args.peers.split(",") or peer == OPTAX),
        args.mesh,
        args.shapes,
      )
  print(f"({repeats} interleaved repeats, median)\n")
  print(table(rows) + "\n")
  print(logging_table(rows) + "\n")
  _common.write_json(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
