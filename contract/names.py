"""The names a job spec gives things, and the rules they follow: they become directory
names on disk and identifiers in SQL, so the spec checks them and storage relies on them."""

from __future__ import annotations

import re

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TABLE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

PROJECTION_ALGORITHMS = ("pca", "umap")
"""The 2-D projections netloupe fits, in the order their coordinate columns are stored."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it is usable as a directory name, else raise a clear error."""
    if not _RUN_NAME.match(name):
        raise ValueError(
            f"run name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example 'mnist-2026-11-22')"
        )
    return name


def table_dir_name(name: str) -> str:
    """A layer or method name as a directory name (module paths like ``features.0`` stay)."""
    if not _TABLE_PART.match(name):
        raise ValueError(f"{name!r} cannot name a table directory: use letters, digits, '.', '_', '-'")
    return name
