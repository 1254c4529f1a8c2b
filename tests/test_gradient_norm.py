"""The logged gradient norm (gradient_ascent_jax/_src/gradient_norm.py)."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from gradient_ascent_jax._src import gradient_norm
from gradient_ascent_jax._src import records

LOGGER = "gradient_ascent_jax"


def _records(caplog):
  return [r for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def log(caplog):
  caplog.set_level(logging.INFO, logger=LOGGER)
  return caplog


# Python-float leaves: op by op, a leaf of its own was read as an array (.ndim). --


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("tree", "norm"),
  [({"t": 0.5}, 0.5), ({"t": -3.0, "u": 4.0}, 5.0), ({"t": 2.0, "u": np.ones(2)}, np.sqrt(6.0))],
  ids=["one", "two", "with_an_array"],
)
def test_norm_of_python_float_leaves(tree, norm, jit):
  norm_of = jax.jit(gradient_norm.global_norm) if jit else gradient_norm.global_norm
  np.testing.assert_allclose(norm_of(tree), norm, rtol=1e-6)


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("names", [("t",), ("t", "u")], ids=["one", "two"])
def test_logging_step_on_python_float_leaves(names, jit, caplog):
  # tx.update({"t": 0.5}, ...) op by op raised AttributeError: 'float' object has
  # no attribute 'ndim'.
  params = dict.fromkeys(names, 1.0)
  grads = dict.fromkeys(names, 0.5)
  tx = gax.gradient_ascent(learning_rate=0.01, logging_interval=1)
  update = jax.jit(tx.update) if jit else tx.update
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    updates, _ = update(grads, tx.init(params), params)
    jax.effects_barrier()
  # First step: lr * g / sqrt((1 - beta) g**2) = 0.01 / sqrt(0.001) for g > 0.
  np.testing.assert_allclose([updates[name] for name in names], 0.01 / np.sqrt(0.001), rtol=1e-5)
  (record,) = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  np.testing.assert_allclose(record.grad_norm, 0.5 * np.sqrt(len(names)), rtol=1e-6)


# Subnormal gradients: XLA:CPU reads subnormal inputs as 0 (denormals-are-zero), before
# any arithmetic, so no lift by a power of two can see them (docs/guide/math.md). ----

cpu_only = pytest.mark.skipif(
  jax.default_backend() != "cpu", reason="measured on XLA:CPU, which flushes subnormal inputs"
)


@cpu_only
# 2**-133: the smallest bfloat16 subnormal; 2**-127: the largest power of two below normal.
@pytest.mark.parametrize(
  "element", [2.0**-133, 1e-39, 2.0**-127], ids=["2**-133", "1e-39", "2**-127"]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_subnormal_gradient_has_norm_zero_as_in_jnp_linalg_norm(dtype, element):
  grads = {"w": jnp.full((4,), element, dtype)}
  # The bits are there (a subnormal, not 0): only XLA's arithmetic flushes them.
  assert np.asarray(grads["w"], np.float64)[0] > 0
  assert float(gradient_norm.global_norm(grads)) == 0.0
  assert float(jax.jit(gradient_norm.global_norm)(grads)) == 0.0
  assert float(jnp.linalg.norm(grads["w"].astype(jnp.float32))) == 0.0
  # The step sees a zero gradient too: it moves nothing, as the log says.
  tx = gax.gradient_ascent(learning_rate=0.01)
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), 0.0)


@cpu_only
def test_float64_subnormals_have_norm_zero_and_the_smallest_normal_is_right(x64):
  tiny = float(jnp.finfo(jnp.float64).tiny)  # 2**-1022
  norm = jax.jit(gradient_norm.global_norm)
  assert float(norm({"w": jnp.full((4,), tiny / 2, jnp.float64)})) == 0.0
  np.testing.assert_allclose(
    float(norm({"w": jnp.full((4,), tiny, jnp.float64)})), 2 * tiny, rtol=1e-12
  )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("make_tree", "norm"),
  [
    (lambda: {"w": jnp.full((4,), 1e-100)}, 2e-100),
    (lambda: {"t": 1e-100, "u": 1e-100}, 2**0.5 * 1e-100),
  ],
  ids=["jnp_full", "python_floats"],
)
def test_weakly_typed_float64_leaves_stay_float64(x64, make_tree, norm, jit):
  # jnp.full with a Python float, or a Python float, is weakly typed: promoted with
  # float32 it gave float32, where 1e-100 is 0.
  norm_of = jax.jit(gradient_norm.global_norm) if jit else gradient_norm.global_norm
  got = norm_of(make_tree())
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(float(got), norm, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_smallest_normal_gradient_is_right_where_jnp_linalg_norm_underflows(dtype):
  tiny = float(jnp.finfo(dtype).tiny)  # 2**-126 in both
  grads = {"w": jnp.full((4,), tiny, dtype)}
  np.testing.assert_allclose(float(jax.jit(gradient_norm.global_norm)(grads)), 2 * tiny, rtol=1e-6)
  # Its squares underflow in float32: jnp.linalg.norm gives 0 (measured).
  assert float(jnp.linalg.norm(grads["w"].astype(jnp.float32))) == 0.0


def test_float16_subnormals_are_right_being_normal_in_float32():
  grads = {"w": jnp.full((4,), 2.0**-24, jnp.float16)}  # the smallest float16 subnormal
  np.testing.assert_allclose(float(jax.jit(gradient_norm.global_norm)(grads)), 2.0**-23, rtol=1e-6)


# The logged norm --------------------------------------------------------------


def _logged_norm(log, grads):
  tx = gax.log_progress(logging_interval=1)
  jax.jit(tx.update)(grads, tx.init(grads))
  jax.effects_barrier()
  (record,) = [r for r in _records(log) if r.levelno == logging.INFO]
  return record.grad_norm


@pytest.mark.parametrize(
  "dtype, value",
  [
    (jnp.float16, 300.0),  # squares overflow float16
    (jnp.float16, 1e-4),  # squares underflow float16
    (jnp.bfloat16, 1e20),  # squares overflow float32, the dtype of its sums
    (jnp.float32, 2e19),  # squares overflow float32, the norm does not
    (jnp.float32, 1e-30),  # squares underflow float32
  ],
)
def test_norm_is_right_wherever_it_is_representable(log, dtype, value):
  element = float(np.asarray(value, dtype))  # the gradient as stored
  norm = _logged_norm(log, {"w": jnp.full((4,), value, dtype)})
  np.testing.assert_allclose(norm, 2 * element, rtol=1e-6)


def test_float64_norm_stays_float64(log, x64):
  norm = _logged_norm(log, {"w": jnp.full((4,), 1e200, jnp.float64)})
  np.testing.assert_allclose(norm, 2e200, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_norm_is_right_at_every_power_of_two(x64, dtype):
  # The norm comes from one of a few sums lifted by fixed powers of two: whichever
  # the magnitude, one of them neither over- nor underflows. Normal numbers only
  # (XLA:CPU reads subnormal inputs as 0), 1000 equal elements, with one larger.
  info = jnp.finfo(dtype)
  norm = jax.jit(gradient_norm.global_norm)
  for exponent in range(info.minexp, info.maxexp - 5):  # up to a norm of 2**127.99
    element = math.ldexp(1.0, exponent)
    tree = {"many": jnp.full((1000,), element, dtype), "one": jnp.array([4 * element], dtype)}
    want = element * math.sqrt(1000 + 16)
    np.testing.assert_allclose(float(norm(tree)), want, rtol=1e-6, err_msg=f"2**{exponent}")


@pytest.mark.parametrize(
  "values, expected",
  [
    ([0.0, 0.0], 0.0),
    ([1.0, np.inf], np.inf),
    ([1.0, np.nan], np.nan),
    ([np.inf, np.nan], np.nan),
    ([-np.inf, 1.0], np.inf),
  ],
)
def test_norm_of_zero_inf_and_nan_gradients(log, values, expected):
  norm = _logged_norm(log, {"w": jnp.array(values, jnp.float16)})
  np.testing.assert_equal(norm, expected)


@pytest.mark.parametrize(
  "grads",
  [{}, {"w": None}, {"w": optax.MaskedNode()}, {"w": jnp.zeros((0, 3))}],
  ids=["empty", "None", "MaskedNode", "zero-size"],
)
def test_norm_of_a_gradient_without_elements_is_zero(log, grads):
  assert _logged_norm(log, grads) == 0.0


def _reductions_in_program(num_leaves):
  tx = gax.log_progress(logging_interval=1)
  grads = [jnp.ones(2) for _ in range(num_leaves)]
  return jax.jit(tx.update).lower(grads, tx.init(grads)).as_text().count("stablehlo.reduce")


def test_norm_reduces_blocks_of_leaves_not_each_leaf():
  # One reduction per leaf makes XLA:CPU's compile time explode with the number
  # of leaves; so does one stack of thousands (5000 leaves: 28 s against 7 s in
  # stacks of 100), so the count grows by one block per 100 leaves of a shape.
  # (Not on a mesh with Auto axes: see tests/test_sharding.py.)
  few = _reductions_in_program(2)
  assert _reductions_in_program(100) == few
  assert few < _reductions_in_program(1000) <= 10 * few  # per leaf: about 2000


def test_norm_of_many_leaves_in_several_blocks(log):
  # 250 leaves of one shape make three blocks; a leaf of another shape a fourth.
  grads = [jnp.full(2, 1.0) for _ in range(249)] + [jnp.full(2, 10.0), jnp.array([3.0])]
  norm = _logged_norm(log, grads)
  np.testing.assert_allclose(norm, np.sqrt(249 * 2 + 200 + 9), rtol=1e-6)


@pytest.mark.parametrize("big, small", [(2e19, 1.0), (1e-30, 3e-31), (1e38, 1e-30)])
def test_norm_of_blocks_of_far_apart_magnitudes(log, big, small):
  # The squares of neither leaf, nor their sum, over- or underflow float32.
  grads = {"big": jnp.full(4, big, jnp.float32), "small": jnp.full(3, small, jnp.float32)}
  big, small = (float(np.float32(x)) for x in (big, small))
  np.testing.assert_allclose(
    _logged_norm(log, grads), math.sqrt(4 * big**2 + 3 * small**2), rtol=1e-6
  )


@pytest.mark.slow  # 4 s or more on 2 cores
def test_leaves_on_different_devices_log(log):
  first, second = jax.devices()[:2]
  params = {"a": jax.device_put(jnp.zeros(2), first), "b": jax.device_put(jnp.zeros(1), second)}
  grads = {
    "a": jax.device_put(jnp.array([3.0, 0.0]), first),
    "b": jax.device_put(jnp.array([4.0]), second),
  }
  tx = gax.gradient_ascent(logging_interval=2)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
  jax.effects_barrier()
  (record,) = _records(log)
  assert record.step == 2
  np.testing.assert_allclose(record.grad_norm, 5.0, rtol=1e-6)
  assert updates["a"].devices() == {first} and updates["b"].devices() == {second}


@pytest.mark.slow  # 2 s or more on 2 cores
def test_norm_of_sharded_leaves_of_one_shape_gathers_nothing():
  # Leaves of one shape are reduced together; raveling them into one vector
  # would make every logging step of an FSDP program all-gather the gradients.
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
  spec = jax.sharding.PartitionSpec
  specs = {"a": spec("x", "y"), "b": spec("x", "y"), "c": spec("y"), "d": spec("y")}
  tree = {
    "a": jnp.full((8, 16), 1.0),
    "b": jnp.full((8, 16), 2.0),
    "c": jnp.full(16, 3.0),
    "d": jnp.full(16, 4.0),
  }
  tree = jax.device_put(tree, {k: jax.sharding.NamedSharding(mesh, s) for k, s in specs.items()})
  text = jax.jit(gradient_norm.global_norm).lower(tree).compile().as_text().lower()
  for collective in ("all-gather", "all-to-all", "collective-permute"):
    assert collective not in text
  expected = math.sqrt(128 * (1 + 4) + 16 * (9 + 16))
  np.testing.assert_allclose(float(gradient_norm.global_norm(tree)), expected, rtol=1e-6)


# The plain sum first; a second sum, lowered or lifted by a power of two, answers
# where the plain one may have over- or underflowed. ----------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_plain_sum_is_taken_from_four_n_tiny_over_eps_up(x64, dtype):
  info = jnp.finfo(dtype)
  size = 1000
  enough = 4.0 * size * float(info.tiny) / float(info.eps)  # float32: 5.6e-32 here
  right = gradient_norm._plain_sum_is_right
  assert bool(right(jnp.asarray(enough, dtype), size, dtype))
  assert not bool(right(jnp.asarray(enough / 2, dtype), size, dtype))
  assert bool(right(jnp.asarray(1.0, dtype), size, dtype))
  for total in (np.inf, np.nan):
    assert not bool(right(jnp.asarray(total, dtype), size, dtype))


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 4.0], ids=["below", "at", "above", "2x_above"])
def test_norm_is_right_on_both_sides_of_where_the_plain_sum_is_taken(scale):
  # 1000 equal float32 elements whose sum of squares is `scale` times the threshold.
  size = 1000
  info = jnp.finfo(jnp.float32)
  element = math.sqrt(scale * 4.0 * float(info.tiny) / float(info.eps))  # about 7.5e-18
  tree = {"w": jnp.full((size,), element, jnp.float32)}
  want = float(np.float32(element)) * math.sqrt(size)
  for norm in (gradient_norm.global_norm, jax.jit(gradient_norm.global_norm)):
    np.testing.assert_allclose(float(norm(tree)), want, rtol=1e-6)


def test_compiled_norm_takes_the_second_sum_only_where_the_plain_one_is_not_right():
  # Run on every logging step, the second pass cost 1.37x logging off against
  # 1.24x in a cond (1e6 parameters in 100 leaves, logging every step, XLA:CPU).
  tree = {"a": jnp.ones((8, 4)), "b": jnp.ones(3)}
  jaxpr = jax.make_jaxpr(gradient_norm.global_norm)(tree).jaxpr
  names = [eqn.primitive.name for eqn in jaxpr.eqns]
  # The plain sums of the two blocks, and their total; then one cond.
  assert names.count("reduce_sum") == 3, names
  (cond,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
  sums = sorted(
    [eqn.primitive.name for eqn in branch.jaxpr.eqns].count("reduce_sum")
    for branch in cond.params["branches"]
  )
  assert sums == [0, 3], sums  # the plain sum's branch sums nothing; the lifted one all


@pytest.mark.parametrize("size", [2, gradient_norm._ADD_SIZE])
def test_small_leaves_are_stacked_and_larger_ones_added(log, size):
  # Stacks copy the leaves; additions cost compile time per leaf (5000 two-element
  # leaves: 10 s against 5 s), so only leaves of _ADD_SIZE elements or more are added.
  leaves = [jnp.full(size, float(i % 7)) for i in range(150)] + [jnp.ones(size + 1)]
  blocks = gradient_norm._blocks(leaves)
  added = size >= gradient_norm._ADD_SIZE
  assert [type(block) is list for block in blocks] == [added, added, False]
  assert [len(block) for block in blocks] == [100, 50, size + 1]
  want = math.sqrt(size * sum((i % 7) ** 2 for i in range(150)) + size + 1)
  np.testing.assert_allclose(_logged_norm(log, leaves), want, rtol=1e-6)


def test_logging_step_copies_no_gradient():
  # Leaves of one shape were once stacked before their reduction: a copy of the
  # gradient on every logging step (4 MB of temporaries here).
  grads = [jnp.ones(10_000) for _ in range(100)]
  for path in ("callback", "state"):
    tx = gax.log_progress(10, emit=path)
    compiled = jax.jit(tx.update).lower(grads, tx.init(grads)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * 10_000 * 100 / 4, (path, temp)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lifts_are_within_reach_of_one(x64, dtype):
  info = jnp.finfo(dtype)
  lower, higher = gradient_norm._lifts(jnp.dtype(dtype))
  widest = (info.maxexp - info.minexp - 2 * info.nmant - 4) // 2
  assert -widest <= lower < 0 < higher <= widest
  # The lower: 2**32 squares of the largest finite value (below 2**maxexp) sum to
  # less than 2**maxexp, a finite number.
  assert 2 * (info.maxexp + lower) + 32 <= info.maxexp
  # The higher: the smallest normal number's square, lifted, is normal.
  assert 2 * (info.minexp + higher) > info.minexp


def test_under_vmap_each_copy_gets_its_own_sum():
  # One copy's plain sum is right, the other's underflows: each answers as it must.
  batch = {"w": jnp.stack([jnp.full(4, 1.0), jnp.full(4, 1e-30)])}
  for norm in (jax.vmap(gradient_norm.global_norm), jax.jit(jax.vmap(gradient_norm.global_norm))):
    np.testing.assert_allclose(norm(batch), [2.0, 2e-30], rtol=1e-6)


@pytest.mark.parametrize("size", [1, 3])
def test_a_zero_gradient_known_when_compiling_has_norm_zero(size):
  # XLA folds a known gradient: (2**86 * 0)**2 regrouped as 2**172 * 0 was NaN.
  zeros = {"w": jnp.zeros(size)}
  assert float(jax.jit(lambda: gradient_norm.global_norm(zeros))()) == 0.0
  scanned = jax.jit(
    lambda: jax.lax.scan(
      lambda c, _: (c, gradient_norm.global_norm({"w": jnp.zeros(size)})), 0, length=2
    )[1]
  )
  np.testing.assert_array_equal(scanned(), [0.0, 0.0])


# Large leaves measured apart: each in a cond of its own, tied to its leaf. --------

LARGE = gradient_norm._APART_SIZE


def _reads_large(eqn):
  return any(math.prod(v.aval.shape) >= LARGE for v in eqn.invars[1:])


def _outer_conds(jaxpr):
  """The conds in ``jaxpr`` and in the jaxprs it holds, but not those inside a cond
  that reads a large leaf (the second sum of that leaf's norm)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      yield eqn
      if _reads_large(eqn):
        continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
        if hasattr(sub, "eqns"):
          yield from _outer_conds(sub)


@pytest.mark.parametrize("path", ["callback", "state"])
def test_the_logging_cond_reads_no_large_gradient(path):
  # A cond that read every gradient kept them all alive until the last one was
  # computed: on XLA:CPU the benchmarks' MLP step cost 1.03-1.04x logging off on
  # steps that log nothing. Each large leaf is now read by a cond of its own that
  # returns its norm alone; the logging cond reads norms and small leaves.
  grads = {"big": jnp.ones(LARGE), "other": jnp.ones(2 * LARGE), "small": jnp.ones(10)}
  tx = gax.gradient_ascent(0.1, logging_interval=10, logging_emit=path)
  jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(grads), grads).jaxpr
  readers = [eqn for eqn in _outer_conds(jaxpr) if _reads_large(eqn)]
  assert len(readers) == 2
  for eqn in readers:
    assert [v.aval.shape for v in eqn.outvars] == [()]
    assert sum(math.prod(v.aval.shape) >= LARGE for v in eqn.invars[1:]) == 1


def _both_ways(tree):
  """The norm of ``tree`` with its large leaves measured apart, op by op and compiled."""

  def norm(tree):
    _, measured = gradient_norm.measure_apart(tree, jnp.asarray(True))
    return gradient_norm.norm_of(measured)

  return norm(tree), jax.jit(norm)(tree)


@pytest.mark.parametrize(
  ("large", "small"),
  [(1.0, 1.0), (3e30, 1e20), (1e-30, 2e-30), (1e-30, 1.0), (0.0, 0.0), (np.inf, 1.0)],
  ids=["ordinary", "squares_overflow", "squares_underflow", "tiny_and_ordinary", "zeros", "inf"],
)
def test_norm_with_large_leaves_measured_apart_is_right(large, small):
  tree = {
    "a": jnp.full(LARGE, large, jnp.float32),
    "b": jnp.full(3 * LARGE, large / 2, jnp.float32),
    "c": jnp.full(7, small, jnp.float32),
  }
  expected = np.sqrt(
    LARGE * np.float64(large) ** 2 + 3 * LARGE * (np.float64(large) / 2) ** 2 + 7 * small**2
  )
  for norm in _both_ways(tree):
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)


def test_nan_in_any_part_is_nan_even_with_inf():
  tree = {"a": jnp.full(LARGE, np.inf), "b": jnp.full(3, np.nan)}
  assert all(np.isnan(float(norm)) for norm in _both_ways(tree))
  tree = {"a": jnp.full(LARGE, np.nan), "b": jnp.full(3, np.inf)}
  assert all(np.isnan(float(norm)) for norm in _both_ways(tree))


def test_float64_large_leaf_keeps_float64(x64):
  # 1e-200 squared is 0 in float64, and 1e-200 is 0 in float32.
  tree = {"a": jnp.full(LARGE, 1e-200, jnp.float64), "b": jnp.full(2, 1e-200, jnp.float64)}
  for norm in _both_ways(tree):
    assert norm.dtype == jnp.float64
    np.testing.assert_allclose(float(norm), 1e-200 * np.sqrt(LARGE + 2), rtol=1e-12)


def test_under_vmap_each_copy_measures_its_large_leaves():
  batch = {"a": jnp.stack([jnp.full(LARGE, 1.0), jnp.full(LARGE, 2.0)]), "b": jnp.ones((2, 3))}
  tx = gax.gradient_ascent(0.1, logging_interval=1, logging_emit="state")
  reader_rows = []

  @jax.jit
  @jax.vmap
  def step(grads):
    updates, state = tx.update(grads, tx.init(grads), grads)
    return updates, state

  updates, state = step(batch)
  (words,) = [leaf for leaf in jax.tree.leaves(state) if leaf.dtype == jnp.uint32]
  for row in np.asarray(words).reshape(2, -1).tolist():
    reader_rows.append(records.unpack(row)[0].grad_norm)
  np.testing.assert_allclose(reader_rows, [np.sqrt(LARGE + 3), np.sqrt(4 * LARGE + 3)], rtol=1e-6)
  # The tied leaves are the gradients, unchanged: the first step moves every element alike.
  np.testing.assert_allclose(updates["a"], updates["a"][:, :1] * np.ones(LARGE), rtol=0)
