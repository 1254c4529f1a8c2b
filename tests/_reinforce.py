"""Notebook 03's REINFORCE on CartPole (notebooks/03_policy_gradient.ipynb), as a
function of the optimizer.

The environment, policy, rollouts, surrogate and training iteration are read from
the notebook itself: its code cells are parsed and only their imports of JAX,
NumPy, Optax and this package, their constants and their functions are run (not
its training, its plots or its optimizer), so the tests follow the notebook
as it is. ``train`` runs the notebook's ``iteration`` with the optimizer given.
"""

import ast
import json
from pathlib import Path

import jax

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "03_policy_gradient.ipynb"
ITERATIONS = 100  # as the notebook's train
_MODULES = {"jax", "jax.numpy", "numpy", "optax", "gradient_ascent_jax"}


def _kept(node: ast.stmt) -> bool:
  if isinstance(node, ast.Import):
    return all(alias.name in _MODULES for alias in node.names)
  if isinstance(node, ast.FunctionDef):
    return not node.decorator_list  # the notebook's jitted train and evaluate
  if isinstance(node, ast.Assign):
    # Constants (GRAVITY, ... = 9.8, ...), not the notebook's optimizer or results.
    return all(isinstance(target, (ast.Name, ast.Tuple)) for target in node.targets) and (
      not isinstance(node.value, ast.Call)
    )
  return False


def _notebook_definitions() -> dict:
  cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
  source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
  module = ast.parse(source)
  module.body = [node for node in module.body if _kept(node)]
  namespace: dict = {}
  exec(compile(module, str(NOTEBOOK), "exec"), namespace)  # noqa: S102
  return namespace


_NOTEBOOK = _notebook_definitions()
init_policy = _NOTEBOOK["init_policy"]


def train(tx, seed):
  """The notebook's 100 iterations from policy ``seed`` with ``tx``; returns the mean
  return of each iteration's 32 episodes and the final optimizer state.

  The notebook's ``iteration`` reads its optimizer from the global ``tx`` and passes
  the mean return as ``value=``; the global is set while this is traced.
  """
  _NOTEBOOK["tx"] = tx
  params = init_policy(jax.random.fold_in(jax.random.key(0), seed))
  keys = jax.random.split(jax.random.fold_in(jax.random.key(1), seed), ITERATIONS)
  (_, opt_state), curve = jax.lax.scan(_NOTEBOOK["iteration"], (params, tx.init(params)), keys)
  return curve, opt_state
