"""The `loramux` import namespace over the repository's `server/`, `engine/` and `kernels/`.

An installed loramux maps `loramux.server`, `loramux.engine` and `loramux.kernels` onto those
folders (pyproject.toml's package-dir); this file gives a source checkout, run from its root
without installing (as on a GPU machine), the same import names.
"""
import os

__path__ = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
