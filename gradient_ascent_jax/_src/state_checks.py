"""The checks of ``init`` and ``update``: the params, the gradients, and the state.

What a state restored without a target is, a state of an earlier layout, and
the state dtypes that cannot hold what the hyperparameters ask. The
hyperparameters themselves are checked when the optimizer is built
(``validation``).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from gradient_ascent_jax._src import numerics
from gradient_ascent_jax._src import once
from gradient_ascent_jax._src import placement
from gradient_ascent_jax._src import validation

# orbax's checkpointer.restore(path) and flax's msgpack_restore give the arrays back in
# plain dicts and lists: the state types are lost, and re-initialising loses the run.
_WITHOUT_TARGET = (
  "a checkpoint restored without a target, as orbax's checkpointer.restore(path) "
  "and flax's serialization.msgpack_restore give it"
)
# The recipes for restoring into a target live in the documentation's Checkpoints
# guide, where they are run and tested; a message names that page only.
_RESTORE_INTO_TARGET = (
  "Do not replace it with tx.init(params), which starts over: carry it over, "
  "state = gax.carry_over(restored, tx.init(params)), which takes the plain dicts "
  "and lists as they are and keeps the moments and counts; or restore the "
  "checkpoint into the structure of tx.init(params), as the Checkpoints guide of "
  "the documentation shows for orbax and flax."
)
# An earlier version's state is carried over, never replaced: tx.init would lose the run.
CARRY_OVER = (
  "Do not replace it with tx.init(params), which starts the run over: carry it "
  "over, state = gax.carry_over(old_state, tx.init(params)), with tx and params "
  "built as the saved run built them. That keeps the moments, the velocity and "
  "the step counts, and the run continues where it stopped."
)


def earlier_layout(name: str, state: Any, fields: tuple[str, ...]) -> ValueError:
  """The error for a stage's state of another layout, as an earlier version saved it."""
  return ValueError(
    f"{name}: the state is a {type(state).__name__} with the fields "
    f"{getattr(state, '_fields', None)}, but {name} now keeps {fields}: a state "
    "saved by an earlier version (pickled, or restored without a target). " + CARRY_OVER
  )


def restored_without_target(name: str, state: Any) -> ValueError:
  """The error for a whole optimizer's state that holds its arrays in plain containers."""
  return ValueError(
    f"{name}: the optimizer state is a plain {type(state).__name__} holding the "
    f"right arrays, not the state that tx.init(params) returns: {_WITHOUT_TARGET}. "
    + _RESTORE_INTO_TARGET
  )


def check_own_state(state: Any, state_type: type, name: str) -> None:
  """Refuses, at trace time, a plain container (or a key) where a stage's state belongs.

  That is what a stage meets when the checkpoint of a chain is restored without a
  target: a dict or list, or, since ``optax.chain`` iterates over the state it is
  given, one key of a restored dict, a string.
  """
  if isinstance(state, state_type) or not isinstance(state, (dict, list, tuple, str)):
    return
  if isinstance(state, tuple) and type(state) is not tuple:
    return  # another NamedTuple: left to the stage's own checks
  raise not_own_state(state, state_type.__name__, name)


def not_own_state(state: Any, expected: str, name: str) -> ValueError:
  """The error for a plain container or a key where the state ``expected`` belongs."""
  found = f"the string {state!r}" if isinstance(state, str) else f"a plain {type(state).__name__}"
  how = (
    (
      " (optax.chain hands each stage one entry of its state, and the entries of a "
      "dict are its keys)"
    )
    if isinstance(state, str)
    else ""
  )
  return ValueError(
    f"{name}: the state is {found}, not the {expected} that "
    f"tx.init(params) returns{how}: {_WITHOUT_TARGET}. " + _RESTORE_INTO_TARGET
  )


def check_gradient_leaves(updates: Any, transform: str) -> None:
  check_array_leaves(
    updates,
    transform,
    "gradient",
    "Pass gradients as arrays, in the tree of the params (as jax.grad gives them).",
  )


def init_accumulator(params, accumulator_dtype, transform: str):
  """Zeros like ``params`` on their devices, in ``accumulator_dtype`` if set."""
  # Again here: 64-bit types may have been switched off since construction.
  validation.check_accumulator_dtype(accumulator_dtype)
  check_floating_params(params, transform)
  return jax.tree.map(lambda p: placement.zeros_like_on_same_devices(p, accumulator_dtype), params)


def check_matches_state(
  updates, accumulator, accumulator_dtype, transform, leaves_checked: bool = False
):
  """Trace-time check: updates must have the tree, shapes (and dtypes) of state.

  ``leaves_checked``: that every leaf is an array was checked already.
  """
  if not leaves_checked:
    check_gradient_leaves(updates, transform)
  # Before the dtype checks: with accumulator_dtype set, a complex update would
  # pass them and lose its imaginary part in the real state.
  check_real_leaves(updates, transform, "gradient", "its state holds real numbers")
  if accumulator_dtype is not None:
    # The moments are stored back in the dtype they came in: a state made with
    # another accumulator_dtype would otherwise silently keep its own.
    expected = jnp.dtype(accumulator_dtype)
    found = sorted({jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(accumulator)})
    if found and found != [expected.name]:
      raise ValueError(
        f"{transform}: the optimizer state holds {', '.join(found)} moments, "
        f"but this optimizer was built with accumulator_dtype={expected.name}. "
        "The state comes from an optimizer with another accumulator_dtype: to go "
        "on with that run, build tx as it was built (accumulator_dtype="
        f"jnp.{found[0]} if that is what it had); to start a new run, call "
        "state = tx.init(params) with this tx."
      )
  try:
    chex.assert_trees_all_equal_structs(updates, accumulator)
    chex.assert_trees_all_equal_shapes(updates, accumulator)
    if accumulator_dtype is None:
      _check_moments_in_gradient_dtypes(updates, accumulator, transform)
  except AssertionError as error:
    raise ValueError(
      f"{transform}: the gradients do not match the optimizer state, which "
      "was initialised from the params. Pass gradients with the same tree "
      "structure, shapes and dtypes as those params (or re-run init). "
      f"Details (tree 0 is the gradients, tree 1 the state): {error}"
    ) from None


def _check_moments_in_gradient_dtypes(updates, accumulator, transform: str) -> None:
  """With ``accumulator_dtype=None`` the moments have the params' dtypes: a leaf
  whose moment has another dtype than its gradient is named, with both causes."""
  pairs = zip(
    jax.tree_util.tree_leaves_with_path(_as_jax_sees_them(updates)),
    jax.tree.leaves(accumulator),
    strict=True,
  )
  for (path, grad), moment in pairs:
    grad_dtype, moment_dtype = jnp.dtype(grad.dtype), jnp.dtype(moment.dtype)
    if grad_dtype != moment_dtype:
      where = jax.tree_util.keystr(path) or "<root>"
      raise ValueError(
        f"{transform}: the gradient {where} is {grad_dtype.name}, but the optimizer "
        f"state holds its moment in {moment_dtype.name}. This optimizer keeps the "
        "moments in the params' dtypes (accumulator_dtype=None). If the state was "
        "made by an optimizer built with accumulator_dtype=jnp."
        f"{moment_dtype.name}, build tx that way to go on with that run; else "
        "pass gradients in the dtypes of the params that init was given."
      )


def _as_jax_sees_them(tree: Any) -> Any:
  """``tree`` with each NumPy leaf's dtype as JAX will compute with it.

  With 64-bit types off (JAX's default) a NumPy float64 gradient is float32 to
  JAX, as under ``jit``, where it matches the float32 state that ``init`` made
  from float64 NumPy params.
  """

  def canonical(leaf: Any) -> Any:
    if isinstance(leaf, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(leaf.shape, jax.dtypes.canonicalize_dtype(leaf.dtype))
    return leaf

  return jax.tree.map(canonical, tree)


# jnp.result_type would read the string "float32" as a dtype: check the type.
_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, int, float, complex)


def check_array_leaves(tree: Any, transform: str, what: str, fix: str) -> None:
  """Raises TypeError naming the first leaf that is neither an array nor a number."""
  if all(isinstance(leaf, _ARRAY_LIKE) for leaf in jax.tree.leaves(tree)):
    return  # the common case, without building paths
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not isinstance(leaf, _ARRAY_LIKE):
      where = jax.tree_util.keystr(path) or "<root>"
      raise TypeError(
        f"{transform}: {what} {where} must be an array, got {leaf!r} of "
        f"type {type(leaf).__name__}. {fix}"
      )


SPLIT_COMPLEX = (
  "For complex parameters, wrap the optimizer: "
  "optax.contrib.split_real_and_imaginary(gax.gradient_ascent(...)) "
  "optimizes the real and imaginary parts as two real parameters. Give it "
  "jnp.conj(jax.grad(objective)(params)): for complex params JAX's gradient is "
  "the conjugate of the direction that raises a real objective."
)


def check_real_leaves(tree: Any, transform: str, what: str, why: str) -> None:
  """Raises TypeError naming the first complex leaf; ``why`` says what needs real numbers."""
  if not any(np.iscomplexobj(leaf) for leaf in jax.tree.leaves(tree)):
    return  # the common case, without building paths
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if np.iscomplexobj(leaf):
      where = jax.tree_util.keystr(path) or "<root>"
      raise TypeError(
        f"{transform}: {what} {where} is complex ({jnp.result_type(leaf).name}), "
        f"but {why}. {SPLIT_COMPLEX}"
      )


def check_floating_params(params: Any, transform: str) -> None:
  """Raises TypeError naming the first leaf that is not a real floating-point array."""
  check_array_leaves(
    params,
    transform,
    "parameter",
    "Keep only arrays in the params: replace other objects with None, or "
    "keep them outside the tree.",
  )
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    where = jax.tree_util.keystr(path) or "<root>"
    try:
      dtype = jnp.result_type(leaf)
    except TypeError:  # a NumPy dtype JAX lacks: object, str, float128, ...
      dtype = None
    if dtype is None and np.issubdtype(leaf.dtype, np.floating):  # float128
      raise TypeError(
        f"{transform}: parameter {where} has dtype {leaf.dtype}, which JAX does "
        "not have (its widest float is float64, with jax_enable_x64 on). Cast it "
        "first, e.g. leaf.astype(np.float64) or jnp.asarray(leaf, jnp.float32)."
      )
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      shown = leaf.dtype if dtype is None else dtype.name
      raise TypeError(
        f"{transform}: parameter {where} has dtype {shown}; only real "
        "floating-point parameters can be optimized. Mask non-trainable "
        "leaves out with optax.masked / optax.multi_transform (or replace "
        f"them with None). {SPLIT_COMPLEX}"
      )
    if jnp.finfo(dtype).bits < 16:
      raise TypeError(
        f"{transform}: parameter {where} has dtype {dtype.name}; parameters "
        "of fewer than 16 bits cannot be optimized: JAX does not promote "
        "them implicitly, and their few mantissa bits would swallow most "
        "updates. Keep float32 or bfloat16 parameters and cast them to "
        f"{dtype.name} where they are used."
      )


_COARSE_HALF = (
  "the stored second moment moves by one unit in the last place where beta "
  "asks for less, so it forgets faster than beta says and, with noisy "
  "gradients, averages low (steps up to about 1.4x larger than with float32 "
  "state)."
)
_COARSE_WIDE = (
  "the stored second moment can stop changing, and after a huge gradient stay saturated for good."
)


def _shown(beta) -> str:
  """``beta`` as the user wrote it: an injected float32 0.999 is not 0.9990000128746033."""
  return f"{float(beta):.6g}" if isinstance(beta, jax.Array) else str(beta)


def warn_if_too_coarse(beta, accumulator, transform: str) -> None:
  """Warns when the state dtype cannot resolve one step of the average.

  m moves by (1 - beta) * (h**2 - m) per step; with 1 - beta below the dtype's
  relative spacing, rounding would undo most steps.
  """
  if isinstance(beta, jax.core.Tracer):  # traced (a jitted init): value unknown here
    return
  # A concrete JAX value (optax.inject_hyperparams, init run eagerly) is read.
  for dtype in sorted({jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(accumulator)}):
    finfo = jnp.finfo(dtype)
    spacing = float(finfo.eps)
    if 1 - float(beta) < spacing:
      # Only a wider state can help, so the advice depends on the state dtype.
      if finfo.bits < 32:
        fix = "Pass accumulator_dtype=jnp.float32 to keep the moments in float32."
      else:
        fix = f"Use a beta with 1 - beta >= {spacing:.3g}"
        if finfo.bits < 64:
          fix += (
            ", or keep the moments in float64: enable "
            "jax.config.update('jax_enable_x64', True) and pass "
            "accumulator_dtype=jnp.float64"
          )
        fix += "."
      once.warn_user(
        f"{transform}: beta={_shown(beta)} is closer to 1 than {dtype} state can resolve "
        f"(relative spacing {spacing:.3g}): "
        f"{_COARSE_HALF if finfo.bits < 32 else _COARSE_WIDE} {fix}"
      )


def check_eps_is_normal(eps, accumulator) -> None:
  """Refuses an eps that the division's dtype reads as 0 (a zero gradient: 0 / 0)."""
  # Below the smallest normal number, eps is 0 or a subnormal that
  # flush-to-zero hardware reads as 0.
  for dtype in {numerics.compute_dtype(leaf.dtype) for leaf in jax.tree.leaves(accumulator)}:
    validation.check_at_least(
      "eps",
      eps,
      float(jnp.finfo(dtype).tiny),
      dtype,
      "a zero gradient would give 0 / 0 = NaN.",
    )
