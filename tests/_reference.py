"""An independent float64 NumPy implementation of the equations in docs/guide/math.md.

Written from the equations alone; it shares no code with the package, so the
tests that compare against it can fail.
"""

from __future__ import annotations

import math

import numpy as np

LR, MOMENTUM, BETA = 0.01, 0.9, 0.999  # gradient_ascent's defaults
EPS = 1e-8


def first_step(h):
  """The first update: m_1 = (1-beta) h^2, s_1 = h / (sqrt(m_1) + eps), v_1 = s_1."""
  return LR * h / (math.sqrt(1 - BETA) * abs(h) + EPS)


FIRST_STEP = first_step(1.0)


class ReferenceGradientAscent:
  """Gradient ascent on a list of float64 arrays, one step at a time."""

  def __init__(
    self,
    learning_rate=0.01,
    momentum=0.9,
    beta=0.999,
    eps=1e-8,
    nesterov=False,
    clip_value=None,
    lr_decay=None,
    warmup_steps=0,
  ):
    self.learning_rate = learning_rate
    self.momentum = momentum
    self.beta = beta
    self.eps = eps
    self.nesterov = nesterov
    self.clip_value = clip_value
    self.lr_decay = lr_decay
    self.warmup_steps = warmup_steps
    self.k = 0
    self.m = None
    self.v = None

  def lr(self, k: int) -> float:
    if callable(self.learning_rate):
      rate = float(self.learning_rate(k))
    else:
      rate = float(self.learning_rate)
    if self.lr_decay is not None:
      rate *= float(self.lr_decay) ** k
    if self.warmup_steps > 0:
      rate *= min(1.0, (k + 1) / self.warmup_steps)
    return rate

  def step(self, grads: list[np.ndarray]) -> list[np.ndarray]:
    """Returns the updates (to be ADDED to the params) for these gradients."""
    grads = [np.asarray(g, np.float64) for g in grads]
    if self.m is None:
      self.m = [np.zeros_like(g) for g in grads]
      self.v = [np.zeros_like(g) for g in grads]
    rate = self.lr(self.k)
    updates = []
    for i, g in enumerate(grads):
      h = g if self.clip_value is None else np.clip(g, -self.clip_value, self.clip_value)
      self.m[i] = self.beta * self.m[i] + (1.0 - self.beta) * h * h
      s = h / (np.sqrt(self.m[i]) + self.eps)
      self.v[i] = self.momentum * self.v[i] + s
      d = s + self.momentum * self.v[i] if self.nesterov else self.v[i]
      updates.append(rate * d)
    self.k += 1
    return updates
