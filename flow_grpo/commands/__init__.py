"""Console commands installed by `pip install .` (see setup.py); `scripts/*.py` are thin wrappers over them.

Each command module defines its absl flags at import, so each lives in its own module.
"""
