"""The features of a tabular run: its feature columns grouped into what an analyst calls a
feature (a number is one column; a categorical is its one-hot columns, together).

Perturbation methods perturb a feature's columns together, every method's per-feature
attribution is the feature's, and the SQL views (``features``, ``feature_attributions_<method>``)
show one row per feature with its original value: the number, or the category.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ONE_HOT_SEPARATOR = "="
"""Between a categorical's name and its category in a one-hot column's name (``sex=Female``)."""


@dataclass(frozen=True)
class Feature:
    """One feature of a tabular model's input."""

    name: str
    columns: tuple[str, ...]
    """Its feature columns, in model order."""
    positions: tuple[int, ...]
    """Their positions among the feature columns."""
    kind: Literal["numeric", "categorical", "group"]
    """``numeric``: one column, its value shown as is; ``categorical``: one-hot columns each
    named ``<name>=<category>``, shown as the category whose column is 1; ``group``: several
    columns shown by name only."""

    @property
    def categories(self) -> list[str]:
        """A categorical's categories, in the order of its columns (empty otherwise)."""
        if self.kind != "categorical":
            return []
        return [column[len(self.name) + len(ONE_HOT_SEPARATOR):] for column in self.columns]


def features_of(feature_columns: list[str] | tuple[str, ...], groups: dict[str, list[str]] | None) -> list[Feature]:
    """The features, in the order of their first column; columns in no group stand alone.

    ``groups`` (name → columns) must name feature columns, each in at most one group, and
    no group may take the name of a column that stands alone: checked here, raising
    ``ValueError`` with the offending names.
    """
    groups = groups or {}
    position = {column: i for i, column in enumerate(feature_columns)}
    owner: dict[str, str] = {}
    for name, members in groups.items():
        unknown = [c for c in members if c not in position]
        if unknown:
            raise ValueError(f"feature group {name!r} names {unknown}, which are not feature columns")
        if not members:
            raise ValueError(f"feature group {name!r} has no columns")
        for column in members:
            if column in owner:
                raise ValueError(f"column {column!r} is in two feature groups ({owner[column]!r} and {name!r})")
            owner[column] = name
    alone = [c for c in feature_columns if c not in owner]
    clash = sorted(set(alone) & set(groups))
    if clash:
        raise ValueError(f"feature group names {clash} are also the names of feature columns outside them")
    features, seen = [], set()
    for column in feature_columns:
        name = owner.get(column, column)
        if name in seen:
            continue
        seen.add(name)
        members = tuple(sorted(groups[name], key=position.__getitem__)) if name in groups else (column,)
        if name not in groups:
            kind = "numeric"
        elif all(m.startswith(name + ONE_HOT_SEPARATOR) for m in members):
            kind = "categorical"
        else:
            kind = "group"
        features.append(Feature(name, members, tuple(position[m] for m in members), kind))
    return features


def membership(features: list[Feature], width: int) -> np.ndarray:
    """``(width, features)``: 1 where a column belongs to a feature."""
    matrix = np.zeros((width, len(features)), dtype=np.float32)
    for j, feature in enumerate(features):
        matrix[list(feature.positions), j] = 1.0
    return matrix


def feature_index(features: list[Feature], width: int) -> np.ndarray:
    """``(width,)``: each column's feature number (a Captum ``feature_mask``)."""
    index = np.zeros(width, dtype=np.int64)
    for j, feature in enumerate(features):
        index[list(feature.positions)] = j
    return index


def feature_values(features: list[Feature], stored: np.ndarray) -> np.ndarray:
    """``(n, features)`` from the stored (not preprocessed) columns: a number's value; a
    categorical's category number (its hot column; NaN when none or several are hot); NaN
    for a group."""
    values = np.full((stored.shape[0], len(features)), np.nan)
    for j, feature in enumerate(features):
        columns = stored[:, list(feature.positions)]
        if feature.kind == "numeric":
            values[:, j] = columns[:, 0]
        elif feature.kind == "categorical":
            hot = columns > 0.5
            single = hot.sum(axis=1) == 1
            values[single, j] = hot[single].argmax(axis=1)
    return values
