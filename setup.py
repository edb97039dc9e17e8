"""Build hook for native extensions (csrc/); all metadata lives in pyproject.toml."""

from setuptools import setup

setup()
