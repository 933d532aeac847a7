"""Every docstring example in the package runs (``make test`` executes them; a stale example fails here)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hfhooks

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(hfhooks.__path__, "hfhooks.") if m.name != "hfhooks.__main__"
)


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


def test_the_package_has_examples():
    # The walk below must find the docstring examples at all: an empty walk would pass vacuously.
    assert sum(len(_examples(m)) for m in MODULES) >= 10


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
