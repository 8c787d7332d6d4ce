"""Build script. Metadata lives in pyproject.toml; this file is where the compiled extensions
(csrc/) will be declared, built against the torch already installed (pip install
--no-build-isolation)."""

from setuptools import setup

setup()
