"""The skip-or-fail rule of tests/_optional.py."""

import pytest

from tests import _optional

ABSENT = "gradient_ascent_jax_no_such_module"


@pytest.mark.parametrize("value", ["1", "true", "True", "yes"])
def test_missing_dependency_fails_in_ci(monkeypatch, value):
  monkeypatch.setenv("CI", value)
  with pytest.raises(pytest.fail.Exception, match="required because CI is set"):
    _optional.import_module(ABSENT, "pip install it")


@pytest.mark.parametrize("value", [None, "", "0", "false"])
def test_missing_dependency_skips_outside_ci(monkeypatch, value):
  if value is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", value)
  with pytest.raises(pytest.skip.Exception, match="pip install it"):
    _optional.import_module(ABSENT, "pip install it")


def test_present_dependency_is_returned(monkeypatch):
  monkeypatch.setenv("CI", "1")
  assert _optional.import_module("math", "").sqrt(4.0) == 2.0


def test_available_means_importable():
  assert _optional.available("math")
  assert not _optional.available(ABSENT)
