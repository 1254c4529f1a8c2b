"""Step time of gradient_ascent against its peers, by parameter count.

One jitted step is ``tx.update`` + ``optax.apply_updates`` with the params and
the optimizer state donated; the gradient is one precomputed buffer reused
every step (not donated), so only the optimizer is timed. Peers, timed
round-robin in the same process:

- ``gax``: ``gax.gradient_ascent`` (progress logging off; its cost is
  measured by ``benchmarks.logging_overhead``);
- ``optax chain``: the same math from stock Optax transforms;
- ``hand-fused``: the same math as one expression per leaf, the floor;
- ``maximize(adam)``: ``gax.maximize(optax.adam)``, a different optimizer;
- ``torch foreach`` / ``torch for-loop``: ``torch.optim.RMSprop(maximize=True,
  momentum=0.9)`` under a ``LambdaLR`` (RMSprop has no Nesterov and no clip,
  so these are n/a in the clip+warmup+decay+nesterov configuration);
- ``probe``: a jitted scaled copy moving the same 28 bytes per parameter.

Before timing, every optimizer peer takes ``_common.CHECK_STEPS`` steps and
must move the params as ``gax.gradient_ascent`` does (``maximize(adam)``: must
ascend), or the run stops with ``PeerMismatchError``.

Run ``python -m benchmarks.step_time --help`` for the options.
"""

from __future__ import annotations

from collections.abc import Sequence
import gc
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common

GAX, OPTAX, FLOOR, ADAM = "gax", "optax chain", "hand-fused", "maximize(adam)"
TORCH_FOREACH, TORCH_LOOP, PROBE = "torch foreach", "torch for-loop", "probe"
PEERS = (GAX, OPTAX, FLOOR, ADAM, TORCH_FOREACH, TORCH_LOOP, PROBE)


def hand_fused_step(config: _common.Config):
  """The whole step written as one expression per leaf: the floor of this design."""

  def leaf(param, grad, second_moment, velocity, rate):
    h = grad
    if config.clip_value is not None:
      h = jnp.clip(h, -config.clip_value, config.clip_value)
    second_moment = config.beta * second_moment + (1 - config.beta) * h * h
    scaled = h / (jnp.sqrt(second_moment) + config.eps)
    velocity = config.momentum * velocity + scaled
    direction = scaled + config.momentum * velocity if config.nesterov else velocity
    return param + rate * direction, second_moment, velocity

  def step(params, state, grads):
    second_moments, velocities, count = state
    rate = config.rate(count)
    new = [
      leaf(*args, rate) for args in zip(params, grads, second_moments, velocities, strict=True)
    ]
    params, second_moments, velocities = (list(column) for column in zip(*new, strict=True))
    return params, (second_moments, velocities, count + 1)

  return jax.jit(step, donate_argnums=(0, 1))


def probe_step(params, state, grads):
  """Reads 16 and writes 12 bytes per parameter, with no optimizer math."""
  moments, velocities = state
  params = [g - p for p, g in zip(params, grads, strict=True)]
  return params, ([-m for m in moments], [-v for v in velocities])


def jax_runners(config, num_params, num_leaves, grads) -> dict[str, Any]:
  runners = {
    GAX: _common.optax_runner(_common.gradient_ascent(config), num_params, num_leaves, grads),
    OPTAX: _common.optax_runner(_common.optax_chain(config), num_params, num_leaves, grads),
  }
  zeros = lambda: _common.make_params(num_params, num_leaves, 0.0)  # noqa: E731
  state = (zeros(), zeros(), jnp.zeros([], jnp.int32))
  runners[FLOOR] = _common.JaxRunner(
    hand_fused_step(config), _common.make_params(num_params, num_leaves), state, grads
  )
  runners[ADAM] = _common.optax_runner(_common.maximize_adam(config), num_params, num_leaves, grads)
  runners[PROBE] = _common.JaxRunner(
    jax.jit(probe_step, donate_argnums=(0, 1)),
    _common.make_params(num_params, num_leaves),
    (zeros(), zeros()),
    grads,
  )
  return runners


class TorchRunner:
  """``torch.optim.RMSprop(maximize=True)`` under a ``LambdaLR``, on its own params.

  ``device``: the torch device, e.g. ``"cuda"``; each timed call then waits
  for the GPU to finish, as the JAX runners do.
  """

  def __init__(self, torch, config, grads, foreach: bool, device: str = "cpu"):
    self.params = []
    for grad in grads:
      param = torch.ones(grad.shape, dtype=torch.float32, device=device, requires_grad=True)
      param.grad = torch.from_numpy(np.array(grad)).to(device)
      self.params.append(param)
    self.optimizer = torch.optim.RMSprop(
      self.params,
      lr=config.learning_rate,
      alpha=config.beta,
      eps=config.eps,
      momentum=config.momentum,
      maximize=True,
      foreach=foreach,
    )
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.torch_factor)
    self.synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

  def __call__(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.optimizer.step()
      self.scheduler.step()
    self.synchronize()

  def snapshot(self) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().astype(np.float64) for p in self.params]


def torch_runners(config, grads, device: str = "cpu") -> dict[str, Any]:
  """The two PyTorch RMSprop peers, or none when torch is absent or not comparable."""
  try:
    import torch
  except ImportError:
    return {}
  if config.nesterov or config.clip_value is not None:
    return {}
  return {
    name: TorchRunner(torch, config, grads, foreach, device)
    for name, foreach in ((TORCH_FOREACH, True), (TORCH_LOOP, False))
  }


# Tolerance of each peer against gax.gradient_ascent in the check before timing:
# the same float32 math in another order (PyTorch: other kernels, its learning
# rate from a float64 LambdaLR). maximize(adam) is another optimizer: it must
# only ascend. The probe is no optimizer and is not checked.
CHECK_RTOLS = {
  GAX: 1e-5,
  OPTAX: 1e-5,
  FLOOR: 1e-5,
  ADAM: None,
  TORCH_FOREACH: 1e-4,
  TORCH_LOOP: 1e-4,
}


def measure_case(
  config, num_params, num_leaves, repeats, min_sample_s, peers=PEERS, torch_device: str = "cpu"
) -> list[dict]:
  size = num_params // num_leaves
  keys = jax.random.split(jax.random.key(0), num_leaves)
  grads = [jax.random.normal(key, (size,), jnp.float32) for key in keys]
  runners = jax_runners(config, num_params, num_leaves, grads)
  runners.update(torch_runners(config, grads, torch_device))
  runners = {name: runner for name, runner in runners.items() if name in peers}
  _common.check_runners(runners, config, grads, CHECK_RTOLS)
  medians = _common.interleaved_medians(runners, repeats, min_sample_s=min_sample_s)
  del runners, grads
  gc.collect()
  total = size * num_leaves
  rows = []
  for peer in (peer for peer in PEERS if peer in peers):
    seconds = medians.get(peer)
    row = {
      "config": config.name,
      "params": total,
      "leaves": num_leaves,
      "peer": peer,
      "seconds": seconds,
      "vs_optax": None,
      "vs_floor": None,
      "gbps": None,
      "of_probe": None,
    }
    if seconds is not None:
      row["gbps"] = _common.BYTES_PER_PARAM * total / seconds / 1e9
      for key, reference in (("vs_optax", OPTAX), ("vs_floor", FLOOR)):
        if reference in medians:
          row[key] = seconds / medians[reference]
      if PROBE in medians:
        row["of_probe"] = medians[PROBE] / seconds
    rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  headers = [
    "params",
    "leaves",
    "peer",
    "time/step",
    "vs optax chain",
    "vs hand-fused",
    "GB/s (28 B/param)",
    "of probe BW",
  ]
  body = []
  for row in rows:
    known = row["seconds"] is not None
    body.append(
      [
        f"{row['params']:.0e}",
        row["leaves"],
        row["peer"],
        _common.fmt_time(row["seconds"]),
        _common.fmt_ratio(row["vs_optax"]),
        _common.fmt_ratio(row["vs_floor"]),
        f"{row['gbps']:.1f}" if known else "n/a",
        f"{row['of_probe']:.0%}" if row["of_probe"] is not None else "n/a",
      ]
    )
  return _common.markdown_table(headers, body)


def targets(rows: list[dict]) -> str:
  """One line per case: the issue's step-time targets for ``gax``, met or not."""
  headers = [
    "config",
    "params",
    "leaves",
    "gax / optax chain (<= 1.05)",
    "gax / hand-fused (<= 1.10)",
    "of probe BW (>= 80%)",
    "faster than torch",
  ]
  body = []
  for row in rows:
    if row["peer"] != GAX:
      continue  # a peer left out of the run (the probe, say) shows as n/a
    case = [
      r
      for r in rows
      if (r["config"], r["params"], r["leaves"]) == (row["config"], row["params"], row["leaves"])
    ]
    torch_times = [
      r["seconds"]
      for r in case
      if r["peer"] in (TORCH_FOREACH, TORCH_LOOP) and r["seconds"] is not None
    ]
    faster = "n/a" if not torch_times else ("yes" if row["seconds"] < min(torch_times) else "NO")
    body.append(
      [
        row["config"],
        f"{row['params']:.0e}",
        row["leaves"],
        _common.fmt_ratio(row["vs_optax"]),
        _common.fmt_ratio(row["vs_floor"]),
        "n/a" if row["of_probe"] is None else f"{row['of_probe']:.0%}",
        faster,
      ]
    )
  return _common.markdown_table(headers, body)


def parse_cases(text: str) -> list[tuple[int, int]]:
  """``"1e7:1000"`` -> ``[(10000000, 1000)]`` (params, leaves)."""
  cases = []
  for item in text.split(","):
    if item.strip():
      params, leaves = item.split(":")
      cases.append((int(float(params)), int(leaves)))
  return cases


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = _common.base_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--sizes", default="1e4,1e5,1e6,1e7,5e7", help="parameter counts in one leaf, comma-separated"
  )
  parser.add_argument(
    "--split", default="1e7:1000", help="PARAMS:LEAVES cases of many leaves, comma-separated"
  )
  parser.add_argument(
    "--configs", default="default,full", help=f"comma-separated subset of {sorted(_common.CONFIGS)}"
  )
  parser.add_argument(
    "--peers",
    default=",".join(PEERS),
    help="comma-separated subset of the peers (ratios need their reference)",
  )
  parser.add_argument(
    "--min-sample-ms",
    type=float,
    default=20.0,
    help="each timed sample runs enough steps to last this long",
  )
  args = parser.parse_args(argv)
  if args.smoke:
    _common.smoke_defaults(parser, args, sizes="1e4", split="1e4:10", min_sample_ms=1.0)
  repeats = args.repeats or (3 if args.smoke else 21)
  cases = [(n, 1) for n in _common.parse_counts(args.sizes)] + parse_cases(args.split)
  configs = [_common.CONFIGS[name] for name in args.configs.split(",")]

  _common.print_header("Step time", argv if argv is not None else sys.argv[1:])
  rows = []
  for config in configs:
    config_rows = []
    for num_params, num_leaves in cases:
      config_rows += measure_case(
        config, num_params, num_leaves, repeats, args.min_sample_ms / 1e3, args.peers.split(",")
      )
    print(f"### {config.name} ({repeats} interleaved samples, median)\n")
    print(table(config_rows) + "\n", flush=True)
    rows += config_rows
  print("### Targets for gax\n")
  print(targets(rows) + "\n")
  _common.write_json(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
