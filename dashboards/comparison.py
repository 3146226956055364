"""What the dashboard's Across-runs tab shows, as plain data: several runs of the same instances
(a model's versions, a run group's checkpoints) opened together.

No Panel here, as in :mod:`netloupe.dashboards.session`: the tab asks a
:class:`ComparisonSession` for frames and draws them, so the numbers are tested headless
(``tests/test_dashboard_compare.py``). The runs are read through
:func:`netloupe.storage.compare.open_runs` and its operators (``storage/sql/compare.sql``:
``agreement``, ``disagreements``, ``map_agreement``, ``subset_metrics_by_run``); one instance in
each run through that run's own :class:`RunSession`, as the Instance tab reads it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from netloupe.contract.errors import did_you_mean
from netloupe.dashboards.session import RunSession, SessionError, map_image, run_key, typed_id
from netloupe.storage.catalog import QueryError, checked_layout, run_query
from netloupe.storage.compare import open_runs, rank_correlations
from netloupe.storage.instance import InstanceRecord
from netloupe.storage.layout import RunLayout
from netloupe.storage.manifest import InfluenceInfo, RunManifest
from netloupe.storage.run_group import group_of, influence_path
from netloupe.storage.training_examples import influential_examples

AGREEMENT = "predictions agree"
"""The scatter's colour of whether runs A and B predict an instance alike."""
AGREE, DISAGREE = "agree", "disagree"
AGREEMENT_COLORS = {AGREE: "#4c78a8", DISAGREE: "#e45756"}
"""Blue where the runs agree, red where they do not: a red pixel among blue ones stands out."""
RANK_CORRELATION = " map rank correlation"
"""Suffix of the scatter's colour choices by a method's per-instance map agreement."""
METRICS_BY_RUN = ("accuracy", "fpr", "fnr", "precision", "recall", "mean_confidence", "size")
"""What the lines over the runs can show: ``subset_metrics_by_run``'s columns."""
ALL = "all"
"""The line of every instance the predicate keeps (all of them without a predicate)."""
MAX_SUBGROUP_LINES = 12
"""Most subgroup lines drawn beside "all" (the first slices in their order): more would be a tangle."""
DISAGREEMENTS_LISTED = 200
"""Disagreements the tab lists (the most confident first)."""

_MAP_AGREEMENT: OrderedDict[tuple, pd.DataFrame] = OrderedDict()
"""Per-instance map agreement by (run A, run B, method), shared by every session of the
process like the projected points: read-only, and a million maps take seconds to compare.
The :data:`MAP_AGREEMENT_KEPT` last used only: a group of K runs has K² pairs, 24 MB each at 1M."""
MAP_AGREEMENT_KEPT = 4


@dataclass(frozen=True)
class InstanceAcrossRuns:
    """One instance in every run, ready to draw side by side."""

    instance_id: object
    records: dict[str, InstanceRecord]
    """Each run's record of the instance, in the runs' order."""
    facts: pd.DataFrame
    """Per run: ``run, prediction, confidence, correct`` and, per method with maps, the rank
    correlation of its map with the reference run's (``<method> ρ with <reference>``)."""
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Per method, each run's map as a 2-D image (channels summed), in the runs' order."""
    bounds: dict[str, float] = field(default_factory=dict)
    """Per method, the largest |value| over every run's map: one symmetric colour scale, so
    that a colour means the same value in every run."""
    own_bounds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per method and run, the largest |value| of that run's map alone."""
    input: np.ndarray | None = None
    """The instance's input as an image (the same in every run: the runs were opened as one
    dataset), or None when it is no image."""
    label: str | None = None
    """The instance's label, by class name."""


class ComparisonSession:
    """One analyst's view of several runs of the same instances (``runs``: name → run
    directory, in order: a group's checkpoint order)."""

    def __init__(self, runs: dict[str, str | Path]):
        self.runs = {name: Path(directory) for name, directory in runs.items()}
        self.con = open_runs(self.runs)
        self._sessions: dict[str, RunSession] = {}

    def close(self) -> None:
        self.con.close()
        for session in self._sessions.values():
            session.con.close()
        self._sessions.clear()

    # -- the runs' facts ---------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    @cached_property
    def manifests(self) -> dict[str, RunManifest]:
        return {name: checked_layout(directory).read_manifest() for name, directory in self.runs.items()}

    @property
    def class_names(self) -> list[str]:
        return list(self.manifests[self.names[-1]].class_names)

    @property
    def metadata_columns(self) -> list[str]:
        return list(self.manifests[self.names[-1]].dataset.metadata_columns)

    @cached_property
    def methods_with_maps(self) -> list[str]:
        """The methods every run stored a map of, in the first run's order (the ones whose
        maps can be compared)."""
        shapes = [m.model.attribution_shapes for m in self.manifests.values()]
        return [method for method, shape in shapes[0].items()
                if shape is not None and all(s.get(method) is not None for s in shapes[1:])]

    def colour_choices(self) -> list[str]:
        """What the agreement scatter can be coloured by."""
        return [AGREEMENT] + [method + RANK_CORRELATION for method in self.methods_with_maps]

    def run_session(self, name: str) -> RunSession:
        """The run ``name`` on its own (opened on first use)."""
        self._check_run(name)
        if name not in self._sessions:
            self._sessions[name] = RunSession(self.runs[name])
        return self._sessions[name]

    def typed_id(self, text: str):
        """An id typed or clicked, as the runs' id type."""
        return typed_id(text, self.manifests[self.names[0]].dataset.id_type)

    def _check_run(self, name: str) -> None:
        if name not in self.runs:
            raise SessionError(f"no run named {name!r} here; {did_you_mean(name, self.names)}")

    # -- predictions and maps of two runs ----------------------------------------------------

    def agreement(self, a: str, b: str) -> dict:
        """``agreement(a, b)``'s row, with ``disagreements`` (instances predicted differently)."""
        self._check_run(a)
        self._check_run(b)
        [row] = run_query(self.con, "SELECT * FROM agreement(?, ?)", [a, b]).to_pylist()
        return {**row, "disagreements": row["instances"] - row["same_prediction"]}

    def disagreements(self, a: str, b: str, limit: int | None = DISAGREEMENTS_LISTED) -> pd.DataFrame:
        """The instances ``a`` and ``b`` predict differently, the most confident disagreement
        first: by the lower of the two confidences (both runs sure of different classes),
        then by id. ``instance_id, label, prediction_a, confidence_a, prediction_b, confidence_b``."""
        self._check_run(a)
        self._check_run(b)
        limit_sql = "" if limit is None else f" LIMIT {int(limit)}"
        return run_query(self.con, "SELECT * FROM disagreements(?, ?) "
                                   "ORDER BY least(confidence_a, confidence_b) DESC, instance_id" + limit_sql,
                         [a, b]).to_pandas()

    def map_agreement(self, a: str, b: str, method: str) -> pd.DataFrame:
        """Per instance (its first target), how alike ``a``'s and ``b``'s maps of ``method``
        are: ``rank_correlation`` (NaN for a constant map) and ``top_k_overlap``, indexed by id."""
        self._check_run(a)
        self._check_run(b)
        if method not in self.methods_with_maps:
            raise SessionError(f"no map of {method!r} in every run to compare; "
                               f"{did_you_mean(method, self.methods_with_maps)}")
        key = (run_key(self.runs[a]), run_key(self.runs[b]), method)
        if key not in _MAP_AGREEMENT:
            frame = run_query(self.con, "SELECT instance_id, rank_correlation, top_k_overlap "
                                        "FROM map_agreement(?, ?, ?) WHERE target_rank = 0", [a, b, method]).to_pandas()
            _MAP_AGREEMENT[key] = frame.set_index("instance_id").astype(float)
            while len(_MAP_AGREEMENT) > MAP_AGREEMENT_KEPT:
                _MAP_AGREEMENT.popitem(last=False)
        _MAP_AGREEMENT.move_to_end(key)
        return _MAP_AGREEMENT[key]

    def agreement_points(self, points: pd.DataFrame, a: str, b: str, colour: str) -> pd.DataFrame:
        """The projected ``points`` with a ``colour`` column: whether ``a`` and ``b`` predict
        each alike (:data:`AGREE`/:data:`DISAGREE`), or a method's map rank correlation."""
        if colour == AGREEMENT:
            differ = points["instance_id"].isin(self.disagreements(a, b, limit=None)["instance_id"]).to_numpy()
            values = pd.Categorical.from_codes(differ.astype(np.int8), categories=[AGREE, DISAGREE])
        elif colour.endswith(RANK_CORRELATION):
            found = self.map_agreement(a, b, colour[: -len(RANK_CORRELATION)])["rank_correlation"]
            values = found.reindex(points["instance_id"]).to_numpy()
        else:
            raise SessionError(f"the agreement scatter is coloured by {self.colour_choices()}, not {colour!r}")
        # A new frame sharing the cached points' columns: the cache is never written to.
        return points.assign(**{colour: values})

    # -- a subset's metric over the runs -------------------------------------------------------

    def groupings(self) -> list[str]:
        """What the lines can be split by, as the Subgroups tab offers: metadata columns and the label."""
        return self.metadata_columns + ["label"]

    def metric_by_run(self, predicate: str = "", grouping: str | None = None, positive: int = 0) -> pd.DataFrame:
        """Per line and run (in the runs' order): ``subgroup, position, run`` and every metric
        of :data:`METRICS_BY_RUN`. The line :data:`ALL` holds the instances where ``predicate``
        (SQL over ``instances``) holds, every instance without one; with a ``grouping`` (a
        metadata column or ``label``), a line per slice of it within them (the slices of the
        Subgroups tab: a column's values, or bins of a many-valued one)."""
        base = predicate.strip() or "true"
        lines = {ALL: base}
        if grouping:
            if grouping not in self.groupings():
                raise SessionError(f"the lines are split by {self.groupings()}, not {grouping!r}")
            slices = self.run_session(self.names[-1]).distribution(grouping)
            for value, condition in list(zip(slices["value"], slices["predicate"]))[:MAX_SUBGROUP_LINES]:
                lines[self._slice_name(grouping, value)] = f"({base}) AND ({condition})"
        frames = []
        for name, condition in lines.items():
            try:
                frame = run_query(self.con, "SELECT * FROM subset_metrics_by_run(?, ?)",
                                  [condition, int(positive)]).to_pandas()
            except QueryError as error:
                raise SessionError(f"the predicate {predicate!r} is not valid SQL over instances ({error})") from None
            frame.insert(0, "subgroup", name)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)[["subgroup", "position", "run", *METRICS_BY_RUN]]

    def _slice_name(self, grouping: str, value) -> str:
        names = self.class_names
        if grouping == "label" and value is not None and str(value).lstrip("-").isdigit() and int(value) < len(names):
            return f"label = {names[int(value)]}"
        return f"{grouping} = {'NULL' if value is None else value}"

    # -- one instance across the runs ------------------------------------------------------------

    def default_instance(self, a: str, b: str) -> tuple[object, str]:
        """The instance to open first and why: the most confident disagreement of ``a`` and
        ``b`` (:meth:`disagreements`), else (they agree everywhere) the first instance."""
        found = self.disagreements(a, b, limit=1)
        if len(found):
            row = found.iloc[0]  # (a row of numbers comes back as floats: the id is read from its column)
            return _plain(found["instance_id"].iloc[0]), (
                f"the disagreement of {a} and {b} where both are most confident "
                f"({a}: {self.class_name(row['prediction_a'])} at {row['confidence_a']:.3f}, "
                f"{b}: {self.class_name(row['prediction_b'])} at {row['confidence_b']:.3f})")
        [first] = run_query(self.con, f'SELECT min(instance_id) AS id FROM "{self.names[0]}".instances').to_pylist()
        return _plain(first["id"]), f"{a} and {b} predict every instance alike; the first instance"

    def instance_across_runs(self, instance_id, reference: str | None = None) -> InstanceAcrossRuns:
        """``instance_id`` in every run: prediction, confidence and maps, each method's maps on
        one colour scale, and each map's rank correlation with ``reference``'s (the last run's
        by default), as ``map_agreement`` computes it."""
        reference = reference or self.names[-1]
        self._check_run(reference)
        records = {name: self.run_session(name).instance(instance_id) for name in self.names}
        methods = [m for m in self.methods_with_maps if all(m in r.maps for r in records.values())]
        rows = []
        for name, record in records.items():
            row = record.row
            facts = {"run": name, "prediction": self.class_name(row["prediction"]),
                     "confidence": row["confidence"], "correct": row["correct"]}
            for method in methods:
                ours, theirs = (np.asarray(records[n].maps[method], np.float64).reshape(1, -1) for n in (name, reference))
                rho = rank_correlations(ours, theirs)[0] if ours.shape == theirs.shape else np.nan
                facts[f"{method} ρ with {reference}"] = None if np.isnan(rho) else float(rho)
            rows.append(facts)
        maps = {method: {name: map_image(records[name].maps[method]) for name in records} for method in methods}
        own = {method: {name: float(np.nanmax(np.abs(image))) if image.size else 0.0 for name, image in images.items()}
               for method, images in maps.items()}
        bounds = {method: max(values.values(), default=0.0) or 1.0 for method, values in own.items()}
        first = next(iter(records.values()))
        picture = map_image(first.input) if isinstance(first.input, np.ndarray) else None
        label = first.row["label"]
        return InstanceAcrossRuns(instance_id=first.instance_id, records=records, facts=pd.DataFrame(rows),
                                  maps=maps, bounds=bounds, own_bounds=own, input=picture,
                                  label=None if label is None else self.class_name(label))

    def class_name(self, index) -> str:
        """A class index by its name ("?" when unknown: a training example gone from its set)."""
        names = self.class_names
        if index is None or pd.isna(index):
            return "?"
        return names[int(index)] if 0 <= int(index) < len(names) else str(index)

    # -- influential training examples --------------------------------------------------------

    def influence_source(self, preferred: str) -> InfluenceSource | None:
        """Where the tab's influence comes from: the run group's (TracIn summed over all its
        checkpoints), else ``preferred``'s own, else the last run's that has one; None when no
        run here computed influence."""
        group = group_of(list(self.runs.values()))
        if group is not None and group[1].influence is not None:
            return InfluenceSource(f"the group's {len(self.names)} checkpoints", influence_path(group[0]),
                                   group[1].influence)
        for name in [preferred, *reversed(self.names)]:
            manifest = self.manifests.get(name)
            if manifest is not None and manifest.influence is not None:
                return InfluenceSource(f"run {name}", RunLayout(self.runs[name]).influence_path, manifest.influence)
        return None

    def influential_examples(self, source: InfluenceSource, instance_id) -> pd.DataFrame:
        """``instance_id``'s proponents then opponents, strongest first, each with its score,
        label (by class name) and ``picture``: its input as an image (None for a feature vector,
        whose values are the frame's columns, or where the training set is gone)."""
        frame = influential_examples(source.path, source.info, instance_id).to_pandas()
        if "train_label" in frame:
            frame["train_label"] = [self.class_name(label) for label in frame["train_label"]]
        shape = self.manifests[self.names[-1]].preprocess.shape
        inputs = source.info.training_input_columns
        if len(inputs) == 1 and inputs[0] in frame:
            frame["picture"] = [_picture(values, shape) for values in frame.pop(inputs[0])]
        return frame


def _picture(values, shape: list[int] | None) -> np.ndarray | None:
    """A stored input as an image (as the Instance tab shows an instance's), if it is one."""
    if values is None:
        return None
    array = np.asarray(values, np.float32)
    if shape and int(np.prod(shape)) == array.size and len(shape) >= 2:
        return map_image(array.reshape(shape))
    side = int(round(np.sqrt(array.size)))
    return map_image(array.reshape(side, side)) if side * side == array.size and side > 1 else None


@dataclass(frozen=True)
class InfluenceSource:
    """Whose ``influence`` table the tab shows."""

    what: str
    """In words: a run group's checkpoints, or a run."""
    path: Path
    info: InfluenceInfo


def _plain(value):
    """A numpy scalar as the Python value it holds (ids are typed into SQL parameters)."""
    return value.item() if isinstance(value, np.generic) else value
