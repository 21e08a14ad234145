"""The cffi extensions (native/build_*.py) are registered here; all metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_fastpath.py:ffibuilder", "native/build_offload.py:ffibuilder"])
