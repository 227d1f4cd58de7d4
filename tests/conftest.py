"""Shared pytest configuration for the whole suite.

Provides ``requires``: a way for a test to declare the external tools or Python modules it
needs. A missing dependency skips the test with a reason on a developer machine, but fails it
when ``CI=true`` (CI installs everything, so a missing tool there is a broken setup that must
not silently turn tests into skips).

Use it as a marker::

    @pytest.mark.requires("nbdinfo", "nbd")
    def test_x() -> None: ...

or as a fixture, inside a test or another fixture::

    def test_y(requires: Requires) -> None:
        fio = requires("fio")   # returns the executable's path
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable

import pytest

# Names that are Python modules rather than executables. Anything else is looked up on PATH.
# A name written "py:NAME" is always treated as a module.
PYTHON_MODULES = frozenset({"nbd"})

Requires = Callable[..., str]


def in_ci() -> bool:
    """True when running under CI, where every optional dependency must be present."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _locate(name: str) -> str | None:
    """Return where ``name`` lives (path of the executable or module), or None if missing."""
    if name.startswith("py:") or name in PYTHON_MODULES:
        module = name.removeprefix("py:")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return None
        return spec.origin or module
    return shutil.which(name)


def requires(*names: str) -> str:
    """Skip (or, under CI=true, fail) the current test unless every name is available.

    Returns the location of the last name, so ``path = requires("fio")`` is convenient.
    """
    if not names:
        raise TypeError("requires() needs at least one tool or module name")
    found = ""
    for name in names:
        where = _locate(name)
        if where is None:
            kind = "Python module" if name in PYTHON_MODULES or name.startswith("py:") else "tool"
            reason = f"{kind} {name.removeprefix('py:')!r} is not installed"
            if in_ci():
                pytest.fail(f"{reason} (CI=true: CI must install it, see scripts/install-deps.sh)")
            pytest.skip(reason)
        found = where
    return found


@pytest.fixture(name="requires")
def requires_fixture() -> Requires:
    """The :func:`requires` helper, as a fixture."""
    return requires


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(*names): skip the test (fail under CI=true) unless these tools / Python "
        "modules are available",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="requires"):
        requires(*marker.args)
