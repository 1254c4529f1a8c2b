"""Small Flax Linen models with a real objective, for steps that do more than the optimizer.

Imported only by the benchmarks that time model steps, so that the others run
without Flax (it is in the ``[test]`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

CLASSES = 10


class MLP(nn.Module):
  """784 -> width -> width -> 10, ReLU: with width 512, 669,706 params in 6 leaves."""

  width: int = 512

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(CLASSES)(x)


class CNN(nn.Module):
  """Two 3x3 convolutions (each with 2x2 average pooling), then two dense layers.

  With channels 32 and width 256 on 28x28x1 images: 824,458 params in 8 leaves,
  most of them in the first dense layer (7*7*64 -> 256).
  """

  channels: int = 32
  width: int = 256

  @nn.compact
  def __call__(self, x):
    for channels in (self.channels, 2 * self.channels):
      x = nn.relu(nn.Conv(channels, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(CLASSES)(x)


class _Sized:
  """How many parameters and leaves ``self.params`` has."""

  params: Any

  @property
  def num_params(self) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(self.params))

  @property
  def num_leaves(self) -> int:
    return len(jax.tree.leaves(self.params))


@dataclasses.dataclass(frozen=True)
class Problem(_Sized):
  """A model's parameters, one fixed batch, and the objective to maximize."""

  name: str
  params: Any
  batch: tuple[jax.Array, jax.Array]
  objective: Callable[[Any, tuple[jax.Array, jax.Array]], jax.Array]


class NnxMLP(nnx.Module):
  """64 -> width -> 10, ReLU, in Flax NNX: with width 64, 4,810 params in 4 leaves.

  The shape of the Flax notebook's classifier of scikit-learn's digits.
  """

  def __init__(self, rngs: nnx.Rngs, width: int = 64):
    self.hidden = nnx.Linear(64, width, rngs=rngs)
    self.out = nnx.Linear(width, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


@dataclasses.dataclass(frozen=True)
class NnxProblem(_Sized):
  """An NNX model (made anew, from the same seed, by ``model()``), one fixed batch,
  and the objective to maximize, a function of the model and the batch."""

  name: str
  model: Callable[[], nnx.Module]
  batch: tuple[jax.Array, jax.Array]
  objective: Callable[[Any, tuple[jax.Array, jax.Array]], jax.Array]

  @property
  def params(self) -> Any:
    return nnx.to_pure_dict(nnx.state(self.model(), nnx.Param))


def nnx_problem(smoke: bool = False) -> NnxProblem:
  """The digits classifier's shapes: a batch of 1,347 inputs of 64 features in [0, 1]
  (random and fixed; the notebook's training split is that large)."""
  x_key, y_key = jax.random.split(jax.random.key(1))
  rows = 32 if smoke else 1347
  inputs = jax.random.uniform(x_key, (rows, 64), jnp.float32)
  labels = jax.random.randint(y_key, (rows,), 0, CLASSES)

  def objective(model, batch):
    inputs, labels = batch
    return -optax.softmax_cross_entropy_with_integer_labels(model(inputs), labels).mean()

  width = 8 if smoke else 64
  return NnxProblem("nnx mlp", lambda: NnxMLP(nnx.Rngs(0), width), (inputs, labels), objective)


def problem(name: str, smoke: bool = False) -> Problem:
  """``"mlp"`` (batch 64 of 784 features) or ``"cnn"`` (batch 32 of 28x28x1 images).

  The data is random and fixed; the objective is the negative mean cross-entropy,
  so that ascending it trains the classifier. ``smoke`` shrinks the model and the
  batch, to check that the benchmark runs.
  """
  if name == "mlp":
    model, shape = MLP(width=16 if smoke else 512), (8 if smoke else 64, 784)
  elif name == "cnn":
    model = CNN(channels=4, width=16) if smoke else CNN()
    shape = (4 if smoke else 32, 28, 28, 1)
  else:
    raise ValueError(f"Unknown model {name!r}: expected 'mlp' or 'cnn'.")
  x_key, y_key, init_key = jax.random.split(jax.random.key(0), 3)
  inputs = jax.random.normal(x_key, shape, jnp.float32)
  labels = jax.random.randint(y_key, shape[:1], 0, CLASSES)

  def objective(params, batch):
    inputs, labels = batch
    logits = model.apply({"params": params}, inputs)
    return -optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  # One compiled init, not one dispatch per layer's initializer.
  params = jax.jit(model.init)(init_key, inputs)["params"]
  return Problem(name, params, (inputs, labels), objective)
