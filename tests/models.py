"""Factories for `path/to/file.py:factory` sources used by the tests."""

from conftest import cnn_factory, mlp_factory  # noqa: F401
