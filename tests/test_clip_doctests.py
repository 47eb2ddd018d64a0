"""The examples in gradwatch.clip's docstrings are true."""
import doctest
import importlib
import pkgutil

import pytest

import gradwatch.clip

MODULES = sorted(name for _, name, _ in pkgutil.iter_modules(gradwatch.clip.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"gradwatch.clip.{name}")
    result = doctest.testmod(module, extraglobs={"mx": importlib.import_module("mlx.core")})
    assert result.failed == 0


def test_there_are_examples():
    examples = sum(doctest.testmod(importlib.import_module(f"gradwatch.clip.{name}"),
                                   extraglobs={"mx": importlib.import_module("mlx.core")}).attempted
                   for name in MODULES)
    assert examples >= 8
