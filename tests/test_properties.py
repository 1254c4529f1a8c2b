"""Property-based tests (Hypothesis) over random pytrees and hyperparameters.

Two profiles: "ci" (the default, a few examples per property) and "thorough"
(at least 200 per property), selected with

  HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py \
      --hypothesis-show-statistics

Hyperparameters are passed as JAX scalars, so a new value is never a new
program; only a new tree structure, shape, dtype or static switch is (which is
why the trees come from a few templates and small shapes).

Every drawn example does real work: a learning rate > 0 (property (e) alone
draws 0), at least one leaf with elements, and no subnormal hyperparameter
(XLA flushes those to 0, the float64 reference would not). Explicit examples
pin the branches 25 random draws could miss (warmup_steps as a Python int and
as a JAX scalar, float64); ``--hypothesis-show-statistics`` lists how often each
dtype and warmup branch was drawn.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple

from _reference import ReferenceGradientAscent
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax

hypothesis.settings.register_profile(
  "ci",
  max_examples=25,
  deadline=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
  "thorough",
  max_examples=200,
  deadline=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INT32_MAX = 2**31 - 1


class Pair(NamedTuple):
  first: object
  second: object


# Tree templates: (number of leaves, builder). Nested dict/list/tuple/NamedTuple.
TEMPLATES = (
  (1, lambda x: x[0]),
  (2, lambda x: {"w": x[0], "b": x[1]}),
  (3, lambda x: [x[0], (x[1], x[2])]),
  (3, lambda x: {"layer": Pair(x[0], [x[1]]), "bias": (x[2],)}),
  (4, lambda x: (x[0], {"a": x[1], "b": Pair(x[2], [x[3]])})),
)
ALL_TEMPLATES = tuple(range(len(TEMPLATES)))
# Shapes with elements come first: Hypothesis shrinks towards the first.
NONEMPTY_SHAPES = ((3,), (2, 3), ())
SHAPES = NONEMPTY_SHAPES + ((0,), (1, 0, 2))  # 0-d and empty arrays included
DTYPES = ("float16", "bfloat16", "float32", "float64")

# Gradient magnitudes drawn per dtype (log-uniform): its whole finite range,
# for float64 a range wide enough for every regime, none of which saturates.
MAGNITUDES = {
  "float16": (6e-8, 6.5e4),
  "bfloat16": (1e-30, 3e38),
  "float32": (1e-30, 3e38),
  "float64": (1e-30, 1e30),
}


class Case(NamedTuple):
  template: int
  shapes: tuple
  dtype: str
  seed: int


def size(shape):
  return math.prod(shape)


@st.composite
def cases(draw, dtypes=DTYPES, templates=ALL_TEMPLATES):
  """A tree of zeros-like params; at least one leaf has elements, so every
  example computes something (empty leaves still ride along)."""
  template = draw(st.sampled_from(list(templates)))
  n_leaves = TEMPLATES[template][0]
  shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n_leaves)]
  if not any(size(shape) for shape in shapes):
    shapes[draw(st.integers(0, n_leaves - 1))] = draw(st.sampled_from(NONEMPTY_SHAPES))
  dtype = draw(st.sampled_from(dtypes))
  hypothesis.event(f"dtype {dtype}")
  return Case(template, tuple(shapes), dtype, draw(st.integers(0, 2**32 - 1)))


def log_uniform(low, high):
  return st.floats(math.log10(low), math.log10(high)).map(lambda e: 10.0**e)


def decay_rates(largest):
  """0, the usual values, or any rate >= 1e-3: never a subnormal, which XLA
  flushes to 0 (a drawn beta of 1.4e-45 made the package compute beta * m = 0
  where the float64 reference kept 4.75e-7)."""
  usual = [rate for rate in (0.0, 0.5, 0.9, 0.999) if rate <= largest]
  return st.sampled_from(usual) | st.floats(1e-3, largest)


@st.composite
def hyperparams(draw, max_momentum=0.999, max_beta=0.99999, learning_rate=None):
  """Valid hyperparameters (docs/guide/hyperparameters.md) as Python numbers.

  The learning rate is > 0 (property (e) covers 0), and lr_decay is either
  None, 1, or a rate in [1e-3, 1] whose powers over a few steps stay normal
  numbers: every example moves the params by an amount the reference can check.
  """
  if learning_rate is None:
    learning_rate = draw(log_uniform(1e-4, 1.0))
  return dict(
    learning_rate=learning_rate,
    momentum=draw(decay_rates(max_momentum)),
    beta=draw(decay_rates(max_beta)),
    # eps >= 1e-10: where h**2 underflows float32, eps then dominates sqrt(m).
    eps=draw(st.just(1e-8) | log_uniform(1e-10, 1e-1)),
    nesterov=draw(st.booleans()),
    clip_value=draw(st.none() | log_uniform(1e-3, 1e3)),
    lr_decay=draw(st.none() | st.just(1.0) | st.floats(0.5, 1.0) | log_uniform(1e-3, 1.0)),
    # Warmup ramps that end within the 1-4 steps of a run, and ones that do not.
    warmup_steps=draw(st.integers(0, 4) | st.integers(0, 10)),
  )


def x64_if(dtype):
  return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def compute_dtype(dtype):
  return jnp.dtype("float64") if dtype == "float64" else jnp.dtype("float32")


def unit_roundoff(dtype):
  return float(jnp.finfo(jnp.dtype(dtype)).eps) / 2


def random_values(rng, shape, dtype, low, high, zero_fraction=0.1):
  magnitude = 10.0 ** rng.uniform(math.log10(low), math.log10(high), shape)
  values = rng.choice([-1.0, 1.0], shape) * magnitude
  values = np.where(rng.random(shape) < zero_fraction, 0.0, values)
  return jnp.asarray(values.astype(jnp.dtype(dtype)))


def make_params(case):
  leaves = [jnp.zeros(shape, case.dtype) for shape in case.shapes]
  return TEMPLATES[case.template][1](leaves)


def make_grads(case, n_steps, magnitudes=None):
  low, high = magnitudes or MAGNITUDES[case.dtype]
  rng = np.random.default_rng(case.seed)
  return [
    TEMPLATES[case.template][1](
      [random_values(rng, shape, case.dtype, low, high) for shape in case.shapes]
    )
    for _ in range(n_steps)
  ]


def as_jax(hp, dtype, python_warmup=False):
  """The numeric hyperparameters as JAX scalars (traced under jit).

  With python_warmup, warmup_steps stays a Python int: the schedule then takes
  its Python branch, not the traced one.
  """
  out = {}
  for name, value in hp.items():
    if name == "nesterov" or value is None:
      out[name] = value
    elif name == "warmup_steps":
      out[name] = value if python_warmup else jnp.asarray(value, jnp.int32)
    else:
      out[name] = jnp.asarray(value, compute_dtype(dtype))
  return out


def as_seen(hp_jax):
  """The hyperparameters as the package sees them (rounded), as Python numbers."""
  return {k: v.item() if isinstance(v, jax.Array) else v for k, v in hp_jax.items()}


def clip_bound_seen(clip_value, dtype):
  """The clip bound in the gradients' dtype: the largest number <= clip_value.

  clip_by_value rounds its bound down (to nearest, values above clip_value
  could pass), so in float16/bfloat16 h is clipped up to one unit in the last
  place below clip_value, and m = h**2 moves by two.
  """
  bound = np.asarray(clip_value, np.float64).astype(jnp.dtype(dtype))
  if float(bound) > clip_value:
    bound = np.nextafter(bound, np.zeros_like(bound))
  return float(bound)


def warmup_event(hp_jax):
  warmup = hp_jax["warmup_steps"]
  if int(warmup) == 0:
    return "warmup off"
  return "warmup as Python int" if isinstance(warmup, int) else "warmup as JAX int32"


def build(hp, accumulator_dtype=None, logging_interval=None):
  return gax.gradient_ascent(
    **hp, logging_interval=logging_interval, accumulator_dtype=accumulator_dtype
  )


class StorageRoundedReference(ReferenceGradientAscent):
  """The float64 reference, storing m (saturated at finfo.max) and v in a dtype.

  The package keeps its state in the params' dtype (or accumulator_dtype), so
  after every step the reference state is rounded the same way.
  """

  def __init__(self, state_dtype, **hp):
    super().__init__(**hp)
    self.state_dtype = jnp.dtype(state_dtype)

  def step(self, grads):
    updates = super().step(grads)
    top = float(jnp.finfo(self.state_dtype).max)
    store = lambda x: x.astype(self.state_dtype).astype(np.float64)  # noqa: E731
    self.m = [store(np.minimum(m, top)) for m in self.m]
    self.v = [store(v) for v in self.v]
    return updates


def leaves64(tree):
  return [np.asarray(x).astype(np.float64) for x in jax.tree.leaves(tree)]


def run_reference(hp_seen, grads_seq, state_dtype, magnitude=False):
  """Reference updates, m and v per step; with magnitude=True fed |g|."""
  ref = StorageRoundedReference(state_dtype, **hp_seen)
  out = []
  for grads in grads_seq:
    flat = leaves64(grads)
    updates = ref.step([np.abs(g) for g in flat] if magnitude else flat)
    out.append((updates, list(ref.m), list(ref.v)))
  return out


def schedule_error(hp_seen, k, dtype):
  """Relative error bound of lr_k in `dtype`: pow(d, k) = exp(k log d) is good to
  about (1 + |k log d|) units of roundoff, the products to a few more."""
  decay = hp_seen["lr_decay"]
  log_term = abs(k * math.log(decay)) if decay else 0.0
  return unit_roundoff(dtype) * (8 + 2 * log_term)


def assert_close(actual, expected, scale, rel, atol, what):
  actual = np.asarray(actual).astype(np.float64)
  bound = rel * scale + atol
  err = np.abs(actual - expected)
  bad = ~(err <= bound) & ~(np.isnan(actual) & np.isnan(expected))
  assert not bad.any(), (
    f"{what}: {bad.sum()} elements off; first: got {actual[bad][:3]}, expected "
    f"{expected[bad][:3]}, allowed {bound[bad][:3]}"
  )


def absolute_tolerance(dtype):
  # Results below the smallest normal may be flushed to 0 (XLA CPU flushes
  # float32 subnormals); float16 keeps subnormals, rounded to their spacing.
  dtype = jnp.dtype(dtype)
  return 2 * max(float(jnp.finfo(dtype).smallest_subnormal), float(jnp.finfo(jnp.float32).tiny))


def check_against_reference(steps, ref, ref_abs, hp_seen, dtype, state_dtype):
  """Every update, m and v within an error bound derived from the magnitudes.

  Each step rounds s, v and the update once in `dtype` and m, v once in the
  state dtype, so the error after t steps is at most about (t + 3) units of
  roundoff of |d| (the update fed |g|), plus the schedule's own error.
  """
  u = max(unit_roundoff(dtype), unit_roundoff(state_dtype))
  atol = max(absolute_tolerance(dtype), absolute_tolerance(state_dtype))
  for t, ((updates, state), (r_u, r_m, r_v), (a_u, _, a_v)) in enumerate(
    zip(steps, ref, ref_abs, strict=True), start=1
  ):
    rel = (t + 3) * u + schedule_error(hp_seen, t - 1, compute_dtype(dtype))
    second_moment, velocity = state[-3].second_moment, state[-2].velocity
    for i, (x, y, scale) in enumerate(zip(leaves64(updates), r_u, a_u, strict=True)):
      assert_close(x, y, scale, rel, atol, f"step {t} update leaf {i}")
    for i, (x, y) in enumerate(zip(leaves64(second_moment), r_m, strict=True)):
      assert_close(x, y, y, rel, atol, f"step {t} second_moment leaf {i}")
    # The stages after flip_sign descend on -objective: their velocity is -v.
    for i, (x, y, scale) in enumerate(zip(leaves64(velocity), r_v, a_v, strict=True)):
      assert_close(x, -y, scale, rel, atol, f"step {t} velocity leaf {i}")


def run_eager(tx, params, grads_seq):
  state = tx.init(params)
  steps = []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    steps.append((updates, state))
  return steps


# (a) -------------------------------------------------------------------------


EVERYTHING = dict(
  learning_rate=0.1,
  momentum=0.9,
  beta=0.9,
  eps=1e-8,
  nesterov=True,
  clip_value=0.5,
  lr_decay=0.9,
  warmup_steps=3,
)
# Momentum, clipping, decay and warmup off: the update is s itself. Where a float16
# moment is subnormal, rounding stalls it, and it must stay there (not move a unit):
# from the smallest subnormal that move reached 0 (a step of 27.8 for 0.0095).
PLAIN_RMS = dict(
  EVERYTHING,
  learning_rate=1.0,
  momentum=0.0,
  beta=0.999,
  nesterov=False,
  clip_value=None,
  lr_decay=None,
  warmup_steps=0,
)


@hypothesis.given(
  case=cases(),
  hp=hyperparams(),
  n_steps=st.integers(1, 4),
  float32_state=st.booleans(),
  python_warmup=st.booleans(),
)
# Every branch at least once in any profile: both warmup types, float64, float16
# with float32 state, and each switch on.
@pytest.mark.slow  # 2 s or more on 2 cores
@hypothesis.example(
  case=Case(3, ((2, 3), (0,), ()), "float64", seed=1),
  hp=EVERYTHING,
  n_steps=4,
  float32_state=False,
  python_warmup=True,
)
@hypothesis.example(
  case=Case(1, ((3,), (2, 3)), "float32", seed=2),
  hp=dict(EVERYTHING, nesterov=False),
  n_steps=4,
  float32_state=False,
  python_warmup=False,
)
@hypothesis.example(
  case=Case(0, ((3,),), "float16", seed=3),
  hp=dict(EVERYTHING, clip_value=None),
  n_steps=4,
  float32_state=True,
  python_warmup=True,
)
@hypothesis.example(
  case=Case(1, ((3,), (3,)), "float16", seed=300),
  hp=PLAIN_RMS,
  n_steps=4,
  float32_state=False,
  python_warmup=False,
)
@hypothesis.example(
  # A float16 moment at its smallest subnormal (5.96e-8); template 1 above: a
  # subnormal moment moved a unit gave 0.0002377 instead of 0.0002362.
  case=Case(4, ((3,), (3,), (3,), (3,)), "float16", seed=300),
  hp=PLAIN_RMS,
  n_steps=3,
  float32_state=False,
  python_warmup=False,
)
def test_agrees_with_numpy_reference(case, hp, n_steps, float32_state, python_warmup):
  """(a) Updates and state follow the equations of docs/guide/math.md.

  Within rounding of the dtype.
  """
  accumulator_dtype = "float32" if float32_state and case.dtype != "float64" else None
  state_dtype = accumulator_dtype or case.dtype
  with x64_if(case.dtype):
    hp_jax = as_jax(hp, case.dtype, python_warmup)
    hypothesis.event(warmup_event(hp_jax))
    hp_seen = as_seen(hp_jax)  # the reference gets the rounded hyperparameters
    if hp_seen["clip_value"] is not None:
      hp_seen["clip_value"] = clip_bound_seen(hp_seen["clip_value"], case.dtype)
    low, high = MAGNITUDES[case.dtype]
    if state_dtype == "float32":
      # A saturated float32 moment no longer holds m_t (see the next test);
      # |h| <= 1e19 keeps m_t <= 1e38 below the float32 maximum.
      high = min(high, 1e19)
    grads_seq = make_grads(case, n_steps, magnitudes=(low, high))
    steps = run_eager(build(hp_jax, accumulator_dtype), make_params(case), grads_seq)
    ref = run_reference(hp_seen, grads_seq, state_dtype)
    ref_abs = run_reference(hp_seen, grads_seq, state_dtype, magnitude=True)
    check_against_reference(steps, ref, ref_abs, hp_seen, case.dtype, state_dtype)


@pytest.mark.slow  # 2 s or more on 2 cores
@hypothesis.given(
  case=cases(dtypes=("float32", "bfloat16")),
  beta=decay_rates(0.99999),
  n_steps=st.integers(1, 4),
)
def test_saturated_float32_moment_step_within_sqrt2_of_exact(case, beta, n_steps):
  """(a) Where m_t exceeds the float32 maximum, s is within sqrt(2) of exact.

  The saturated state holds only a lower bound on m_t; s divides by
  max(sqrt(largest), sqrt(1 - beta) |h|), a lower bound on sqrt(m_t) that is
  exact when the huge gradient dominates and at most sqrt(1 + beta) too small
  otherwise: s is never smaller than exact, at most sqrt(1 + beta) <= sqrt(2)
  larger, and never beyond RMSprop's bound 1 / sqrt(1 - beta). Huge gradients
  (1e17 to 3e38).
  """
  hp = dict(
    learning_rate=1.0,
    momentum=0.0,
    beta=beta,
    eps=1e-8,
    nesterov=False,
    clip_value=None,
    lr_decay=None,
    warmup_steps=0,
  )  # so the update is s
  hp_jax = as_jax(hp, "float32")
  grads_seq = make_grads(case, n_steps, magnitudes=(1e17, 3e38))
  steps = run_eager(build(hp_jax, "float32"), make_params(case), grads_seq)
  ref = run_reference(as_seen(hp_jax), grads_seq, "float32")
  rel = 8 * unit_roundoff(case.dtype)
  beta_seen = float(as_seen(hp_jax)["beta"])
  for t, ((updates, _), (r_u, _, _)) in enumerate(zip(steps, ref, strict=True), start=1):
    for i, (got, exact) in enumerate(zip(leaves64(updates), r_u, strict=True)):
      assert (np.sign(got) == np.sign(exact)).all(), f"step {t} leaf {i}: sign"
      ratio = np.abs(exact[exact != 0] / got[exact != 0])
      # Never smaller than exact, at most sqrt(1 + beta) larger.
      assert (ratio <= 1 + rel).all() and (ratio >= (1 - rel) / math.sqrt(1 + beta_seen)).all(), (
        f"step {t} leaf {i}: |exact / got| = {ratio}"
      )
      assert (np.abs(got) <= (1 + rel) / math.sqrt(1 - beta_seen)).all(), f"step {t} leaf {i}"


# (b) -------------------------------------------------------------------------


@pytest.mark.slow  # 3 s or more on 2 cores
@hypothesis.given(
  case=cases(),
  hp=hyperparams(),
  accumulator=st.sampled_from([None, "float32"]),
  logging_interval=st.sampled_from([None, 0, 3]),
)
def test_state_structure_shapes_and_dtypes(case, hp, accumulator, logging_interval):
  """(b) The chain's state: one stage per stage of the documented chain.

  Moments shaped like params.
  """
  with x64_if(case.dtype):
    params = make_params(case)
    tx = build(as_jax(hp, case.dtype), accumulator, logging_interval)
    state = tx.init(params)
    (grads,) = make_grads(case, 1)
    updates, new_state = tx.update(grads, state, params)

    logging_on = bool(logging_interval)
    expected_types = (
      [gax.LogProgressState] * logging_on
      + [gax.FlipSignState]
      + [optax.EmptyState] * (hp["clip_value"] is not None)
      + [gax.ScaleByAdaptiveRmsState, gax.MomentumState, gax.ScaleByWarmupDecayState]
    )
    state_dtype = jnp.dtype(accumulator or case.dtype)
    for before, steps_taken in ((state, 0), (new_state, 1)):
      assert isinstance(before, tuple)
      assert [type(s) for s in before] == expected_types
      for moments in (before[-3].second_moment, before[-2].velocity):
        assert jax.tree.structure(moments) == jax.tree.structure(params)
        for moment, param in zip(jax.tree.leaves(moments), jax.tree.leaves(params), strict=True):
          assert moment.shape == param.shape
          assert moment.dtype == state_dtype
      counts = [before[-1].count] + ([before[0].count] if logging_on else [])
      for count in counts:
        assert count.shape == () and count.dtype == jnp.int32
        assert int(count) == steps_taken
    for moment in jax.tree.leaves(state[-3:-1]):
      assert not np.asarray(moment).any()  # m_0 = v_0 = 0
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    for update, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert update.shape == grad.shape and update.dtype == grad.dtype


# (c) -------------------------------------------------------------------------


def all_finite(tree):
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


@pytest.mark.slow  # 3 s or more on 2 cores
@hypothesis.given(
  case=cases(),
  # |s| <= 1/sqrt(1 - beta) <= 31.7, |v| <= 31.7 / (1 - 0.9), |d| <= 1.9 |v|,
  # so |update| <= lr * 602 < the float16 maximum 65504: overflow is impossible.
  hp=hyperparams(max_momentum=0.9, max_beta=0.999),
  n_steps=st.integers(1, 5),
  extremes=st.booleans(),
)
def test_finite_gradients_give_finite_updates_and_state(case, hp, n_steps, extremes):
  """(c) Any finite gradients, up to the dtype's largest, give finite results."""
  with x64_if(case.dtype):
    grads_seq = make_grads(case, n_steps)
    if extremes:  # the largest finite and the smallest subnormal, both signs
      info = jnp.finfo(jnp.dtype(case.dtype))
      picks = np.array([info.max, -info.max, info.smallest_subnormal, 0.0], np.float64)
      grads_seq = [
        jax.tree.map(lambda g, p=p: jnp.full_like(g, p), grads)
        for grads, p in zip(grads_seq, np.resize(picks, n_steps), strict=True)
      ]
    steps = run_eager(build(as_jax(hp, case.dtype)), make_params(case), grads_seq)
    for t, (updates, state) in enumerate(steps, start=1):
      assert all_finite(updates), f"non-finite update at step {t}"
      assert all_finite(state), f"non-finite state at step {t}"


# (d) -------------------------------------------------------------------------


@hypothesis.given(
  case=cases(dtypes=("float16", "bfloat16", "float32")),
  clip_value=log_uniform(1e-6, 1e6),
  as_jax_scalar=st.booleans(),
  with_infinities=st.booleans(),
)
def test_clip_by_value_stays_within_bound(case, clip_value, as_jax_scalar, with_infinities):
  """(d) Every clipped value lies in [-clip_value, clip_value]; others unchanged."""
  (grads,) = make_grads(case, 1, magnitudes=(1e-8, 6e4))
  if with_infinities:
    grads = jax.tree.map(
      lambda g: (
        g.ravel().at[:2].set(jnp.array([jnp.inf, -jnp.inf], g.dtype)[: g.size]).reshape(g.shape)
      ),
      grads,
    )
  bound = jnp.asarray(clip_value, jnp.float32) if as_jax_scalar else clip_value
  exact = float(bound)  # the value the user asked for
  tx = gax.clip_by_value(bound)
  clipped, _ = tx.update(grads, tx.init(None))
  assert jax.tree.structure(clipped) == jax.tree.structure(grads)
  for out, g in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads), strict=True):
    assert out.dtype == g.dtype
    out64, g64 = np.asarray(out).astype(np.float64), np.asarray(g).astype(np.float64)
    assert (np.abs(out64) <= exact).all()
    inside = np.abs(g64) <= exact
    np.testing.assert_array_equal(out64[inside], g64[inside])
    # Outside: the representable value nearest below the bound (or the dtype's
    # largest, for a bound beyond its range), with g's sign.
    cap = min(exact, float(jnp.finfo(g.dtype).max))
    info = jnp.finfo(g.dtype)
    spacing = max(float(info.eps) * cap, float(info.smallest_subnormal))
    assert (np.sign(out64[~inside]) == np.sign(g64[~inside])).all()
    assert (cap - np.abs(out64[~inside]) <= spacing).all()


@hypothesis.given(
  case=cases(dtypes=("float16", "bfloat16", "float32")),
  clip_value=log_uniform(0.1, 100.0),
  hp=hyperparams(),
)
def test_clip_stage_inside_gradient_ascent(case, clip_value, hp):
  """(d) In the chain: with beta = 0 the first second moment is h**2, h clipped."""
  hp = dict(hp, clip_value=clip_value, beta=0.0)
  # |g| >= 0.01 keeps h**2 a normal float16 number (>= 6.1e-5), clip <= 100
  # keeps it below the float16 maximum.
  (grads,) = make_grads(case, 1, magnitudes=(1e-2, 6e4))
  tx = build(as_jax(hp, case.dtype))
  _, state = tx.update(grads, tx.init(make_params(case)))
  u = unit_roundoff(case.dtype)
  for moment, g in zip(
    jax.tree.leaves(state[-3].second_moment), jax.tree.leaves(grads), strict=True
  ):
    root = np.sqrt(np.asarray(moment).astype(np.float64))
    g64 = np.abs(np.asarray(g).astype(np.float64))
    # h**2 is rounded once to float32 and once to the state dtype: 2u each.
    assert (root <= clip_value * (1 + 2 * u)).all()
    expected = np.minimum(g64, clip_value)
    np.testing.assert_allclose(root, expected, rtol=4 * u, atol=1e-30)


# (e) -------------------------------------------------------------------------


@hypothesis.given(
  case=cases(),
  hp=hyperparams(max_momentum=0.9, max_beta=0.999, learning_rate=0.0),
  n_steps=st.integers(1, 4),
  python_zero=st.booleans(),
)
def test_zero_learning_rate_gives_zero_updates(case, hp, n_steps, python_zero):
  """(e) learning_rate = 0 (Python or JAX) never moves the parameters."""
  with x64_if(case.dtype):
    hp_jax = as_jax(hp, case.dtype)
    if python_zero:
      hp_jax["learning_rate"] = 0.0
    params = make_params(case)
    steps = run_eager(build(hp_jax), params, make_grads(case, n_steps))
    for updates, _ in steps:
      for update in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(update).astype(np.float64), 0.0)


# (f) -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("static",))
def jitted_update(hp_numbers, grads, state, static):
  nesterov, accumulator_dtype = static
  return build(dict(hp_numbers, nesterov=nesterov), accumulator_dtype).update(grads, state)


@pytest.mark.slow  # 5 s or more on 2 cores
@hypothesis.given(
  case=cases(templates=(1, 3)),
  hp=hyperparams(),
  n_steps=st.integers(1, 3),
  accumulator=st.sampled_from([None, "float32"]),
)
def test_jit_and_eager_agree(case, hp, n_steps, accumulator):
  """(f) Compiled and op-by-op execution agree to rounding.

  Not bit for bit: under jit XLA fuses beta * m + (1 - beta) * h**2 into
  fused multiply-adds, which round once instead of twice.
  """
  accumulator = None if case.dtype == "float64" else accumulator
  with x64_if(case.dtype):
    hp_jax = as_jax(hp, case.dtype)
    hp_numbers = {k: v for k, v in hp_jax.items() if k != "nesterov"}
    params = make_params(case)
    grads_seq = make_grads(case, n_steps)
    eager = run_eager(build(hp_jax, accumulator), params, grads_seq)
    state = build(hp_jax, accumulator).init(params)
    compiled = []
    for grads in grads_seq:
      updates, state = jitted_update(hp_numbers, grads, state, (hp["nesterov"], accumulator))
      compiled.append((updates, state))
    hp_seen = as_seen(hp_jax)
    ref_abs = run_reference(hp_seen, grads_seq, accumulator or case.dtype, magnitude=True)
    jit_as_ref = [  # in the reference's sign convention (v = -velocity)
      (leaves64(u), leaves64(s[-3].second_moment), [-v for v in leaves64(s[-2].velocity)])
      for u, s in compiled
    ]
    check_against_reference(
      eager, jit_as_ref, ref_abs, hp_seen, case.dtype, accumulator or case.dtype
    )


# (g) -------------------------------------------------------------------------


@hypothesis.given(
  case=cases(), hp=hyperparams(), n_steps=st.integers(1, 3), python_warmup=st.booleans()
)
def test_maximize_of_descent_chain_is_gradient_ascent(case, hp, n_steps, python_warmup):
  """(g) maximize(the descent chain) is gradient_ascent, bit for bit."""
  with x64_if(case.dtype):
    hp_jax = as_jax(hp, case.dtype, python_warmup)
    descent = optax.chain(
      *([gax.clip_by_value(hp_jax["clip_value"])] if hp["clip_value"] is not None else []),
      gax.scale_by_adaptive_rms(hp_jax["beta"], hp_jax["eps"]),
      gax.momentum(hp_jax["momentum"], hp_jax["nesterov"]),
      gax.scale_by_warmup_decay(
        hp_jax["learning_rate"], hp_jax["warmup_steps"], hp_jax["lr_decay"]
      ),
    )
    params = make_params(case)
    grads_seq = make_grads(case, n_steps)
    ascent_steps = run_eager(build(hp_jax), params, grads_seq)
    maximize_steps = run_eager(gax.maximize(descent), params, grads_seq)
    for (u_a, s_a), (u_m, s_m) in zip(ascent_steps, maximize_steps, strict=True):
      assert jax.tree.structure(u_a) == jax.tree.structure(u_m)
      for x, y in zip(jax.tree.leaves((u_a, s_a)), jax.tree.leaves((u_m, s_m)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# (h) -------------------------------------------------------------------------


def spec_learning_rate(base, lr_decay, warmup_steps, k):
  """The schedule of docs/guide/math.md in Python float64: base(k) * lr_decay**k * min(1, t / W)."""
  rate = base(k)
  if lr_decay is not None:
    rate *= lr_decay**k
  if warmup_steps > 0:
    rate *= min(1.0, (k + 1) / warmup_steps)
  return rate


@pytest.mark.slow  # 12 s
@hypothesis.given(
  learning_rate=log_uniform(1e-4, 10.0),
  as_schedule=st.booleans(),
  warmup_steps=st.integers(0, 2000) | st.just(INT32_MAX),
  lr_decay=st.none() | st.just(1.0) | st.floats(0.5, 1.0) | st.floats(1e-3, 1.0),
  jax_hyperparams=st.booleans(),
  counts=st.lists(st.integers(0, INT32_MAX) | st.integers(0, 3000), min_size=1, max_size=8),
  x64=st.booleans(),
)
def test_schedule_matches_spec_formula(
  learning_rate, as_schedule, warmup_steps, lr_decay, jax_hyperparams, counts, x64
):
  """(h) warmup_decay_schedule and scale_by_warmup_decay follow the formula.

  Counts are any int32 value, and the edges: 0, around warmup_steps, the max.
  """
  counts = sorted(
    set(counts) | {0, INT32_MAX} | {min(max(warmup_steps + d, 0), INT32_MAX) for d in (-1, 0, 1)}
  )
  dtype = "float64" if x64 else "float32"
  with jax.enable_x64(x64):
    wide = compute_dtype(dtype)
    # What the package computes with: the hyperparameters rounded to `wide`.
    lr_seen = float(np.asarray(learning_rate, wide))
    decay_seen = None if lr_decay is None else float(np.asarray(lr_decay, wide))
    if as_schedule:  # base(k) = lr / (1 + k / 1000), an inverse-time decay
      base = lambda k: jnp.asarray(lr_seen, wide) / (1 + jnp.asarray(k, wide) / 1000)  # noqa: E731
      base_seen = lambda k: lr_seen / (1 + k / 1000)  # noqa: E731
    else:
      base = jnp.asarray(learning_rate, wide) if jax_hyperparams else learning_rate
      base_seen = lambda k: lr_seen  # noqa: E731
    warmup = jnp.asarray(warmup_steps, jnp.int32) if jax_hyperparams else warmup_steps
    decay = lr_decay
    if jax_hyperparams and lr_decay is not None:
      decay = jnp.asarray(lr_decay, wide)
    schedule = gax.warmup_decay_schedule(base, warmup, decay)
    count_array = jnp.asarray(counts, jnp.int32)
    got = np.asarray(jax.vmap(schedule)(count_array)).astype(np.float64)

    tx = gax.scale_by_warmup_decay(base, warmup, decay)
    ones = jnp.ones((), wide)
    stage = jax.vmap(lambda c: tx.update(ones, gax.ScaleByWarmupDecayState(count=c)))
    stage_updates, stage_state = stage(count_array)

  hp_seen = {"lr_decay": decay_seen}
  for i, k in enumerate(counts):
    expected = spec_learning_rate(base_seen, decay_seen, warmup_steps, k)
    # k itself is rounded to `wide` before the power: it adds |k log d| roundoffs.
    rel = schedule_error(hp_seen, k, wide) + (8 * unit_roundoff(wide) if as_schedule else 0)
    atol = 2 * float(jnp.finfo(wide).tiny) * max(1.0, lr_seen)
    assert abs(got[i] - expected) <= rel * expected + atol, (k, got[i], expected)
    assert np.isfinite(got[i])
    assert abs(-float(stage_updates[i]) - expected) <= rel * expected + atol
  np.testing.assert_array_equal(
    np.asarray(stage_state.count), np.minimum(np.asarray(counts, np.int64) + 1, INT32_MAX)
  )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reference_comparison_detects_a_wrong_learning_rate(dtype):
  """The low-precision comparison is not vacuous: a 3% wrong lr is caught."""
  case = Case(1, ((3,), (2, 3)), dtype, seed=7)
  hp = dict(
    learning_rate=0.01,
    momentum=0.9,
    beta=0.999,
    eps=1e-8,
    nesterov=False,
    clip_value=None,
    lr_decay=None,
    warmup_steps=0,
  )
  hp_jax = as_jax(hp, dtype)
  grads_seq = make_grads(case, 2, magnitudes=(1e-2, 1e2))
  steps = run_eager(
    build(dict(hp_jax, learning_rate=jnp.float32(0.0103))), make_params(case), grads_seq
  )
  hp_seen = as_seen(hp_jax)
  ref = run_reference(hp_seen, grads_seq, dtype)
  ref_abs = run_reference(hp_seen, grads_seq, dtype, magnitude=True)
  with pytest.raises(AssertionError, match="update"):
    check_against_reference(steps, ref, ref_abs, hp_seen, dtype, dtype)
