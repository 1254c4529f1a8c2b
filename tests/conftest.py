"""Test setup: 8 fake CPU devices for pmap/sharding, set before JAX starts.

The tests import the installed gradient_ascent_jax (``pip install -e .``
installs this checkout; CI also installs the built wheel, at the lowest and
the newest supported versions, and runs the quick tests from a copy of the
checkout without the package). The checkout is appended
to ``sys.path``, after site-packages, for the ``tests`` and ``benchmarks``
helpers, so it never stands in for the installed copy.

Where a test goes: one test file per module of ``gradient_ascent_jax/_src``
(``tests/test_X.py`` for ``X.py``: ``test_numerics.py``, ``test_state_checks.py``,
``test_gradient_norm.py``, ...), plus integration tests named after what they
integrate with (``test_flax.py``, ``test_sharding.py``, ``test_torch_parity.py``,
``test_checkpoint.py``, ``test_notebooks.py``, ...; ``test_bad_inputs.py`` for
bad inputs that no one module answers). Helpers shared by several files live in
``tests/_*.py``. Tests that take long are marked ``@pytest.mark.slow``:
``pytest -m "not slow"`` is the quick check; plain ``pytest`` (CI) runs them all.
"""

import os
from pathlib import Path
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# The script that made the fixtures of earlier releases ran in those releases' venvs.
collect_ignore = ["fixtures"]

CHECKOUT = str(Path(__file__).resolve().parent.parent)
if CHECKOUT not in sys.path:
  sys.path.append(CHECKOUT)


def pytest_report_header(config):
  import gradient_ascent_jax as gax  # after the XLA flags above

  return f"gradient_ascent_jax {gax.__version__} from {gax.__file__}"


@pytest.fixture
def x64():
  """Runs the test body with float64 enabled."""
  with jax.enable_x64(True):
    yield
