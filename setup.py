"""setuptools entry point; all metadata lives in pyproject.toml.

setup() with no arguments reads that metadata. The file serves tools that still run setup.py
(``python setup.py develop``; pip before 21.3, which cannot make an editable install without it).
"""
from setuptools import setup

setup()
