"""Optional oracles and tools (PyTorch, a browser, ...): skip locally, fail in CI.

A developer without the optional dependency gets a SKIPPED test with the
reason. When the ``CI`` environment variable is set (``.ci/run`` sets it, as
do GitHub Actions and most CI services), the dependency is part of the test
environment, and its absence is an error: a check that silently stops running
would otherwise still report green.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
  """True when ``CI`` is set to anything but empty, ``0`` or ``false``."""
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def missing(reason: str) -> None:
  """Skips the calling test (or module), or fails it when running in CI."""
  if in_ci():
    pytest.fail(f"{reason} (required because CI is set)", pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def available(name: str) -> bool:
  """Whether ``name`` imports (a package that is found but fails to import is not)."""
  try:
    importlib.import_module(name)
  except ImportError:
    return False
  return True


def import_module(name: str, install_hint: str) -> ModuleType:
  """Imports ``name``; when it is not importable, see :func:`missing`."""
  try:
    return importlib.import_module(name)
  except ImportError as error:
    missing(f"optional dependency {name!r} is not importable ({error}); {install_hint}")
    raise  # unreachable: missing() always raises
