"""Parity with PyTorch: torch.optim.RMSprop(maximize=True) + LambdaLR + clip_grad_value_.

weight_decay is RMSprop's own weight_decay (coupled: added to the clipped gradient).

docs/guide/math.md: with clip_value=None and nesterov=False, gradient_ascent is RMSprop with
momentum, ascending, under a LambdaLR whose factor at step k is
lr_decay**k * min(1, (k + 1) / warmup_steps); clipping is clip_grad_value_ on the
gradients before the step. Both sides train the same float64 MLP from the same weights
on the same data, each on its own trajectory, and the parameters are compared after
every step. (PyTorch's RMSprop has no Nesterov, so nesterov is not compared here.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests import _mlp
from tests import _optional

# Skipped without torch, except in CI (.ci/run installs exactly this CPU wheel).
torch = _optional.import_module("torch", "pip install torch==2.13.0 (CPU wheel, as .ci/run)")

STEPS = 250
# Float64 on both sides; the trajectories agree to ~1e-11 (rounding differs in the order
# of a few operations, and each side follows its own gradients). Relative to each leaf's
# largest element: weight decay pulls some weights through 0, where an element's own
# relative difference means nothing (measured: 1.8e-9 for one element at 2e-4, an
# absolute 3.9e-13).
RTOL = 1e-9

TORCH_CONFIGS = {
  "defaults": {},
  "warmup_decay": dict(learning_rate=0.05, warmup_steps=50, lr_decay=0.995),
  "clip": dict(learning_rate=0.02, clip_value=0.5),
  "momentum0": dict(learning_rate=0.01, momentum=0.0, beta=0.99),
  "beta0_warmup": dict(learning_rate=0.002, beta=0.0, momentum=0.5, warmup_steps=20),
  "clip_warmup_decay": dict(
    learning_rate=0.02,
    momentum=0.7,
    beta=0.99,
    eps=1e-6,
    clip_value=0.5,
    warmup_steps=30,
    lr_decay=0.995,
  ),
  "weight_decay": dict(learning_rate=0.01, weight_decay=0.05),
  "clip_weight_decay": dict(learning_rate=0.02, clip_value=0.5, weight_decay=0.05),
}


class TorchRun:
  """The same MLP and objective in PyTorch, trained by RMSprop(maximize=True)."""

  def __init__(self, config):
    options = {**dict(learning_rate=0.01, momentum=0.9, beta=0.999, eps=1e-8), **config}
    weights = _mlp.init_weights()
    # The order of jax.tree.leaves on the JAX params: hidden.b, hidden.w, out.b, out.w.
    self.params = [
      torch.tensor(weights[layer][name], dtype=torch.float64, requires_grad=True)
      for layer in ("hidden", "out")
      for name in ("b", "w")
    ]
    x, y = _mlp.make_data()
    self.x = torch.tensor(x, dtype=torch.float64)
    self.y = torch.tensor(y, dtype=torch.float64)
    self.clip_value = options.get("clip_value")
    self.largest_gradient = 0.0
    self.optimizer = torch.optim.RMSprop(
      self.params,
      lr=options["learning_rate"],
      alpha=options["beta"],
      eps=options["eps"],
      momentum=options["momentum"],
      weight_decay=options.get("weight_decay", 0.0),
      maximize=True,
    )
    lr_decay, warmup_steps = options.get("lr_decay"), options.get("warmup_steps", 0)

    def factor(k):
      decay = lr_decay**k if lr_decay is not None else 1.0
      warmup = min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0
      return decay * warmup

    # LambdaLR applies factor(0) at construction and factor(k) after its k-th step(), so
    # optimizer step k (counting from 0) runs with factor(k).
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

  def step(self):
    """One step; returns the learning rate it used."""
    b1, w1, b2, w2 = self.params
    self.optimizer.zero_grad()
    prediction = torch.tanh(self.x @ w1 + b1) @ w2 + b2
    objective = -torch.mean((prediction - self.y) ** 2)
    objective.backward()
    self.largest_gradient = max(
      [self.largest_gradient] + [float(p.grad.abs().max()) for p in self.params]
    )
    if self.clip_value is not None:
      torch.nn.utils.clip_grad_value_(self.params, self.clip_value)
    rate = self.optimizer.param_groups[0]["lr"]
    self.optimizer.step()
    self.scheduler.step()
    return rate

  def numpy_params(self):
    return [p.detach().numpy() for p in self.params]


@pytest.mark.slow  # 3 s or more on 2 cores
@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_matches_torch_rmsprop_maximize(name, x64):
  config = TORCH_CONFIGS[name]
  torch.set_num_threads(1)
  x, y = (jnp.asarray(a, jnp.float64) for a in _mlp.make_data())
  params = _mlp.as_jax(_mlp.init_weights(), jnp.float64)
  tx = gax.gradient_ascent(**config, logging_interval=None)
  schedule = gax.warmup_decay_schedule(
    config.get("learning_rate", 0.01), config.get("warmup_steps", 0), config.get("lr_decay")
  )
  rates = np.asarray(jax.vmap(schedule)(jnp.arange(STEPS)))

  @jax.jit
  def step(params, state):
    grads = jax.grad(_mlp.objective)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  reference = TorchRun(config)
  for got, want in zip(jax.tree.leaves(params), reference.numpy_params(), strict=True):
    np.testing.assert_array_equal(got, want)  # the same starting point
  state = tx.init(params)
  worst = worst_abs = 0.0
  for k in range(STEPS):
    params, state = step(params, state)
    torch_rate = reference.step()
    # The learning rate PyTorch used at step k is the one the schedule gives for count k.
    np.testing.assert_allclose(torch_rate, rates[k], rtol=1e-14)
    for got, want in zip(jax.tree.leaves(params), reference.numpy_params(), strict=True):
      scale = float(np.max(np.abs(want)))
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=f"step {k}")
      difference = np.abs(np.asarray(got) - want)
      worst = max(worst, float(np.max(difference)) / scale)
      worst_abs = max(worst_abs, float(np.max(difference)))
  if config.get("clip_value") is not None:  # the clip really was active
    assert reference.largest_gradient > config["clip_value"]
  print(
    f"\n[torch parity] {name}: {STEPS} steps, max difference of params {worst_abs:.3e}, "
    f"{worst:.3e} of their leaf's largest"
  )
