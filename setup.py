"""setuptools entry point; all metadata lives in pyproject.toml.

Kept as its own file because a later step builds the optional CUDA C++ extension (kernels/cuda) here.
"""
from setuptools import setup

setup()
