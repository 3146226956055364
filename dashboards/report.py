"""A run's findings as one static HTML file: ``netloupe report RUN --output FILE.html``.

What an analyst mails to a reviewer or pastes into a wiki: the run's facts, the fidelity
table, the subgroups (FairVis' worst ones among them), the neuron matrix per class, the
instance scatter and the most confident mistakes with their maps. The file stands alone:
every image is a PNG inside it (a ``data:`` URI), the styles are inline, and a
Content-Security-Policy forbids the browser any other load, so it renders offline and
nothing in it can reach a server.

Everything comes from :class:`RunSession` (the numbers every dashboard view shows) and the
run's catalog; nothing needs a Panel server. Images are drawn here once, statically: the
scatter by Datashader (as :mod:`netloupe.dashboards.scatter` draws it, so a million points
cost one raster), the matrix by Matplotlib (Captum's own dependency), the maps as the
instance view blends them (:func:`netloupe.dashboards.session.blended_map`). Every table
is an aggregate or bounded, so the report of a million instances costs about what one of
a thousand does (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from netloupe.contract.errors import NetloupeError, did_you_mean
from netloupe.dashboards.scatter import CATEGORY_COLORS, padded_bounds
from netloupe.dashboards.session import (
    AGAINST,
    BOUNDARY,
    TOWARD,
    RunSession,
    blended_map,
    map_image,
    segment_boundaries,
)
from netloupe.storage.catalog import run_query
from netloupe.storage.training_examples import influential_examples_of

MISTAKES = 8
"""The most confident mistakes shown by default (``--mistakes``)."""
MAX_MISTAKES = 100
"""Most mistakes a report shows: each reads one instance's maps, and a page of a hundred is long enough."""
SUBGROUP_COLUMNS = 3
"""Metadata columns searched together for the worst subgroups (the operators take one to three)."""
WORST_SUBGROUPS, MIN_SUBGROUP_SIZE = 10, 30
"""The suggested subgroups listed, and the smallest one considered (the Subgroups tab's)."""
OVERVIEW_COLUMNS = 12
"""Metadata columns whose slices the overview tabulates (the first ones)."""
CLASS_ROWS = 20
"""Classes in the per-class table; beyond, the ones with the lowest recall."""
DISTINCT_NEURONS = 3
"""Neurons named per class under the matrix: those most above the other classes' mean."""
SCATTER_SIZE = (600, 450)
"""Pixels of each scatter image (two side by side on a page)."""
SCATTER_MIN_ALPHA, SCATTER_SPREAD_THRESHOLD, SCATTER_MAX_SPREAD = 120, 0.9, 3
"""A lone point's opacity (of 255), and the ``dynspread`` threshold and largest radius of the
spreading: a static image cannot be zoomed, so sparse points are drawn opaque and spread up
to 3 pixels each side."""
OUTCOME_COLORS = {"correct": "#4c78a8", "incorrect": "#e45756", "unlabeled": "#bbbbbb"}
"""The scatter by outcome: a red mistake stands out among blue correct instances."""
LEGEND_LIMIT = 20
"""Categories named under a scatter."""
MAP_PIXELS = 168
"""Pixels per side (at least) of each input and map of a mistake: a 28-pixel digit enlarged 6 times."""
FEATURES_PER_MISTAKE = 10
INFLUENTIAL_PER_SIGN = 3
"""Proponents and opponents shown per mistake, when the run computed influence."""
"""A tabular mistake's features per method (the largest |values|)."""
MATRIX_INCHES, MATRIX_MAX_ROW_INCHES = 11.0, 10.0
"""The matrix image's width, and the most height its rows take (a thousand classes stay one page)."""


class ReportError(NetloupeError):
    """The report cannot be made or written as asked."""


@dataclass(frozen=True)
class Section:
    """One part of the report: an anchor, a title and its HTML (or a one-line note why it is absent)."""

    anchor: str
    title: str
    body: str


# -- the file ---------------------------------------------------------------------------------

def write_report(run_dir, output, layer: str | None = None, mistakes: int = MISTAKES) -> Path:
    """Write the report of the run at ``run_dir`` to ``output``, atomically (a temporary file
    beside it, renamed over it): a reader never sees half a report. Returns the path written."""
    if not 0 <= mistakes <= MAX_MISTAKES:
        raise ReportError(f"--mistakes {mistakes}: give 0 to {MAX_MISTAKES}")
    output = Path(output)
    if output.is_dir():
        raise ReportError(f"--output {output} is a directory; give a file name, e.g. {output / 'report.html'}")
    if not output.parent.is_dir():
        problem = "is not a directory" if output.parent.exists() else "does not exist"
        raise ReportError(f"--output {output}: {output.parent} {problem}")
    session = RunSession(run_dir)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text("")  # first: an unwritable place fails before the work
    except OSError as error:
        raise ReportError(f"cannot write the report to {output}: {error.strerror or error}") from None
    try:
        temporary.write_text(render_report(session, layer, mistakes), encoding="utf-8")
        os.replace(temporary, output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report to {output}: {error.strerror or error}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return output


def render_report(session: RunSession, layer: str | None = None, mistakes: int = MISTAKES) -> str:
    """The whole report of ``session``'s run as one HTML document."""
    if layer is not None and layer not in session.layers:
        raise ReportError(f"--layer {layer}: no such recorded layer; {did_you_mean(layer, session.layers)}")
    layer = layer if layer is not None else (session.layers[-1] if session.layers else None)
    sections = [summary_section(session), fidelity_section(session), subgroups_section(session),
                matrix_section(session, layer), scatter_section(session, layer), mistakes_section(session, mistakes)]
    return page(session, sections)


def page(session: RunSession, sections: list[Section]) -> str:
    name = html.escape(session.manifest.run_name)
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    contents = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{s.body}</section>' for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>netloupe report: {name}</title>
<style>{STYLE}</style></head>
<body><header><h1>netloupe report: {name}</h1>
<p class="made">Written {made} by netloupe {html.escape(_netloupe_version())} from the run's catalog; a static
file (no server, nothing loaded from elsewhere). The numbers are those of the dashboard's views.</p>
<nav><ol>{contents}</ol></nav></header>
{body}
</body></html>
"""


STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       max-width: 1240px; margin: 0 auto; padding: 0 1.5em 3em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.made, .note, figcaption, .caption { color: #555; font-size: 0.9em; }
.note { font-style: italic; }
nav ol { columns: 2; font-size: 0.95em; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { width: 11em; }
code { font-size: 0.85em; background: #f6f6f6; padding: 0 3px; word-break: break-word; }
.grid { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
.bar { display: inline-block; height: 0.8em; vertical-align: middle; }
.track { display: inline-block; width: 120px; background: #eee; height: 0.8em; vertical-align: middle; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; vertical-align: middle; }
.legend span.item { margin-right: 1em; white-space: nowrap; font-size: 0.88em; }
figure { margin: 0; } img { image-rendering: pixelated; border: 1px solid #ddd; }
.mistake { border: 1px solid #ddd; border-radius: 4px; padding: 0.6em 0.9em; margin: 1em 0; page-break-inside: avoid; }
.mistake h3 { margin-top: 0.2em; }
.contribution td.bars { width: 260px; }
@media print { nav { display: none; } section { page-break-before: auto; } }
"""


# -- the run in a table -----------------------------------------------------------------------

def summary_section(session: RunSession) -> Section:
    """What was explained, by what, when, and how well the model did."""
    manifest = session.manifest
    spec = manifest.spec or {}
    overall = run_query(session.con, "SELECT * FROM subset_summary(?)", ["true"]).to_pylist()[0]
    labeled = run_query(session.con, "SELECT count(*) AS n, count(*) FILTER (WHERE correct) AS right "
                                     "FROM instances WHERE correct IS NOT NULL").to_pylist()[0]
    accuracy = ("no labeled instances" if not labeled["n"] else
                f"{overall['accuracy']:.4f} ({labeled['right']:,} of {labeled['n']:,} labeled instances correct)")
    timings = manifest.timings
    took = f", explained in {_duration(timings['total_seconds'])}" if timings.get("total_seconds") else ""
    facts = {
        "run": manifest.run_name + (" (handmade: numbers given, no model)" if manifest.handmade else ""),
        "model": _model_description(spec.get("model") or {}, manifest),
        "classes": _listed(session.class_names),
        "dataset": _dataset_description(spec.get("dataset") or {}, manifest),
        "instances": f"{manifest.counts.instances:,}",
        "layers": _listed([f"{name} ({neurons:,} neurons)" for name, neurons in manifest.model.layer_neurons.items()])
                  or "none recorded",
        "methods": _listed([f"{name} {tuple(shape) if shape else '(per token)'}"
                            for name, shape in manifest.model.attribution_shapes.items()]) or "none",
        "committed": datetime.fromtimestamp(manifest.created_unix, UTC).strftime("%Y-%m-%d %H:%M UTC") + took,
        "accuracy": accuracy,
        "mean confidence": _number(overall["mean_confidence"]),
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    body = f'<table class="facts">{rows}</table>' + class_metrics_table(session)
    return Section("summary", "Run summary", body)


def class_metrics_table(session: RunSession) -> str:
    """Per class: instances, times predicted, precision and recall (the worst recalls when there are many)."""
    frame = run_query(session.con, "SELECT * FROM class_metrics()").to_pandas()
    if frame.empty or frame["support"].fillna(0).sum() == 0:
        return ""
    names = session.class_names
    frame["class"] = [names[int(c)] if 0 <= int(c) < len(names) else str(c) for c in frame["class"]]
    shown = frame if len(frame) <= CLASS_ROWS else frame.sort_values("recall", na_position="last").head(CLASS_ROWS)
    title = ("Per class" if len(frame) <= CLASS_ROWS
             else f"The {CLASS_ROWS} classes of lowest recall (of {len(frame):,})")
    return f"<h3>{title}</h3>" + table(shown[["class", "support", "predicted", "precision", "recall"]])


def fidelity_section(session: RunSession) -> Section:
    """The Fidelity tab's table: each method's checks averaged over the run."""
    summary = session.fidelity_summary()
    if summary.empty:
        return Section("fidelity", "Fidelity of each method",
                       note("This run has no fidelity table (a handmade run, or one made by an older netloupe)."))
    checks = [c for c in summary.columns if c not in ("method", "instances", "sampled") and summary[c].notna().any()]
    if not checks:
        return Section("fidelity", "Fidelity of each method",
                       note("No fidelity check was made in this run (fidelity: in the job spec)."))
    kept = [c for c in summary.columns if c in ("method", "instances", "sampled") or c in checks]
    legend = ("Convergence delta: Integrated Gradients' and DeepLift's completeness error (0 is exact). Deletion "
              "AUC: the target's probability as the most attributed features are removed (lower is better); "
              "insertion AUC: as they are put back (higher is better). On the sampled instances: infidelity and "
              "sensitivity-max (lower is better), and the rank correlation with the maps of a randomly "
              "re-initialised model (near 0 passes the model-randomization check).")
    return Section("fidelity", "Fidelity of each method", table(summary[kept]) + f'<p class="caption">{legend}</p>')


# -- subgroups (FairVis) ----------------------------------------------------------------------

def subgroups_section(session: RunSession) -> Section:
    """Each metadata column's slices (size and accuracy), then the worst subgroups of the
    first columns and their intersections, as the Subgroups tab suggests them."""
    columns = session.metadata_columns
    if not columns:
        return Section("subgroups", "Subgroups", note("This run has no metadata columns to form subgroups of."))
    searched = columns[:SUBGROUP_COLUMNS]
    worst = session.suggested_subgroups(searched, "accuracy", min_size=MIN_SUBGROUP_SIZE, k=WORST_SUBGROUPS)
    parts = [f"<h3>The worst subgroups by accuracy (at least {MIN_SUBGROUP_SIZE} instances)</h3>"]
    if worst.empty:
        parts.append(note(f"No subgroup of {', '.join(searched)} has {MIN_SUBGROUP_SIZE} labeled instances."))
    else:
        shown = worst[["subgroup", "level", "size", "value", "overall", "gap", "fpr", "fnr", "predicate"]].rename(
            columns={"value": "accuracy", "overall": "run accuracy"})
        parts.append(table(shown, code=("predicate",)))
        parts.append(f'<p class="caption">Searched: every slice of {html.escape(", ".join(searched))} and their '
                     "intersections; gap = how much lower than the run's accuracy. FPR and FNR are of class "
                     f"{html.escape(session.class_names[0])} (one against the rest). Each predicate selects its "
                     "subgroup in <code>netloupe sql</code> and in the dashboard.</p>")
    parts.append("<h3>Each metadata column's slices</h3>")
    overview = [slice_table(column, session.distribution(column)) for column in columns[:OVERVIEW_COLUMNS]]
    parts.append(f'<div class="grid">{"".join(overview)}</div>')
    if len(columns) > OVERVIEW_COLUMNS:
        parts.append(note(f"The first {OVERVIEW_COLUMNS} of {len(columns)} metadata columns are shown."))
    return Section("subgroups", "Subgroups", "".join(parts))


def slice_table(column: str, frame: pd.DataFrame) -> str:
    """One column's slices as rows, each with its accuracy as a bar (red low, green high)."""
    rows = []
    for value, size, accuracy in zip(frame["value"], frame["size"], frame["accuracy"]):
        shown = "NULL" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
        rows.append(f"<tr><td>{html.escape(shown)}</td><td class='number'>{int(size):,}</td>"
                    f"<td class='number'>{_number(accuracy)}</td><td>{_accuracy_bar(accuracy)}</td></tr>")
    return (f"<table><tr><th>{html.escape(column)}</th><th>instances</th><th>accuracy</th><th></th></tr>"
            + "".join(rows) + "</table>")


def _accuracy_bar(accuracy) -> str:
    if accuracy is None or not np.isfinite(accuracy):
        return ""
    red, green = round(220 * (1 - accuracy)), round(160 * accuracy)
    return (f'<span class="track"><span class="bar" style="width:{100 * accuracy:.1f}%;'
            f'background:rgb({red},{green},60)"></span></span>')


# -- the neuron matrix (ActiVis) --------------------------------------------------------------

def matrix_section(session: RunSession, layer: str | None) -> Section:
    """The layer's mean activation per class (from the run's stored sums: no scan), as a heat
    map, and per class the neurons most above the other classes."""
    title = "Neuron activation matrix per class"
    if layer is None:
        return Section("matrix", title, note("No layer was recorded in this run."))
    by = "label" if _has_labels(session) else "prediction"
    matrix = session.class_matrix(layer, by)
    wide = matrix.pivot(index="subset", columns="neuron", values="mean")
    wide = wide.reindex([s for s in dict.fromkeys(matrix["subset"]) if s in wide.index])
    if wide.empty:
        return Section("matrix", f"{title}: {layer}", note(f"No instance has a {by} to group by."))
    image = figure_uri(_matrix_figure(wide, layer, by))
    sizes = matrix.drop_duplicates("subset").set_index("subset")["size"]
    distinct = []
    for subset in wide.index:
        others = wide.drop(index=subset)
        lift = wide.loc[subset] - (others.mean(axis=0) if len(others) else 0.0)
        top = lift.sort_values(ascending=False, kind="stable").head(DISTINCT_NEURONS)
        distinct.append({"subset": subset, "instances": int(sizes.get(subset, 0)),
                         "neurons most above the other classes": ", ".join(
                             f"{int(n)} (mean {wide.loc[subset, n]:.3g}, {lift[n]:+.3g})" for n in top.index)})
    body = (f'<figure><img alt="mean activation of each neuron of {html.escape(layer)} per {by}" src="{image}" '
            f'style="max-width:100%"><figcaption>{html.escape(layer)}: mean activation of each of its '
            f"{wide.shape[1]:,} neurons (columns) over the instances of each {by} (rows).</figcaption></figure>"
            + table(pd.DataFrame(distinct)))
    return Section("matrix", f"{title}: {layer}", body)


def _matrix_figure(wide: pd.DataFrame, layer: str, by: str):
    from matplotlib.figure import Figure

    rows = wide.shape[0]
    height = min(MATRIX_MAX_ROW_INCHES, 0.32 * rows) + 1.3
    figure = Figure(figsize=(MATRIX_INCHES, height), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    values = wide.to_numpy(dtype=float)
    shown = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest" if wide.shape[1] <= 1024
                        else "antialiased")  # more neurons than pixels: averaged, not dropped
    if rows <= 40:
        axes.set_yticks(range(rows), [str(s) for s in wide.index], fontsize=8)
    else:
        axes.set_ylabel(f"{rows:,} {by} classes")
    axes.set_xlabel(f"neuron of {layer}")
    figure.colorbar(shown, ax=axes, label="mean activation", fraction=0.04, pad=0.01)
    return figure


# -- the instance scatter ---------------------------------------------------------------------

def scatter_section(session: RunSession, layer: str | None) -> Section:
    """The projection of the chosen layer (else the first), every point datashaded: by class,
    and by whether the model got it right."""
    title = "Instances in 2-D"
    projections = [f"{kind}/{source}" for kind, source in session.projections]
    if not projections:
        return Section("scatter", title, note("This run has no 2-D projection (projection: in the job spec)."))
    chosen = f"activations/{layer}" if f"activations/{layer}" in projections else projections[0]
    kind, source = chosen.split("/", 1)
    points = session.points(kind, source, "pca")
    finite = np.isfinite(points["x"].to_numpy()) & np.isfinite(points["y"].to_numpy())
    if not finite.all():  # a copy only then: the frame maps the run's columns
        points = points[finite]
    if points.empty:
        return Section("scatter", title, note(f"The PCA of {chosen} has no finite point."))
    column = "label_name" if points["label_name"].notna().any() else "prediction_name"
    by_class = _scatter_figure(points, column, _category_colors(points[column]),
                               f"PCA of {kind} {source}, coloured by {column.removesuffix('_name')}")
    by_outcome = _scatter_figure(points, "outcome", OUTCOME_COLORS, f"PCA of {kind} {source}, coloured by outcome")
    left_out = session.manifest.counts.instances - len(points)
    caption = (f"Every one of the {len(points):,} projected instances, aggregated into pixels by Datashader (no "
               "sampling): a colour is the class mix of a pixel, denser pixels more opaque, lone points spread to "
               "be seen." + (f" {left_out:,} instances without a finite projection are left out." if left_out else ""))
    return Section("scatter", f"{title}: {chosen}",
                   f'<div class="grid">{by_class}{by_outcome}</div><p class="caption">{caption}</p>')


def spread_counts(counts: np.ndarray, threshold: float, max_px: int) -> np.ndarray:
    """Each pixel's counts added to its neighbours within a disc, its radius chosen as Datashader's
    ``dynspread`` chooses it: the largest (up to ``max_px``) at which at most ``threshold`` of the
    drawn pixels have another drawn pixel within twice the radius (lone points grow, dense
    regions stay exact). In numpy: Datashader's own spreading kernel is compiled by numba at
    every start of a process (~8 s here), which a one-shot command would pay every time.
    ``(H, W, categories)`` → the same shape."""
    drawn = counts.sum(axis=2) > 0
    if not drawn.any():
        return counts
    radius = 0
    for px in range(1, max_px + 1):
        if _crowded_fraction(drawn, 2 * px) > threshold:
            break
        radius = px
    if radius == 0:
        return counts
    height, width = drawn.shape
    padded = np.zeros((height + 2 * radius, width + 2 * radius, counts.shape[2]), counts.dtype)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dy * dy + dx * dx <= (radius + 0.5) ** 2]  # Datashader's circle mask
    for dy, dx in offsets:
        padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width] += counts
    return padded[radius:radius + height, radius:radius + width]


def _crowded_fraction(drawn: np.ndarray, reach: int) -> float:
    """The fraction of drawn pixels with another drawn pixel in the square of ``reach`` around
    them (Datashader's density heuristic), by a summed-area table."""
    table = np.pad(drawn.astype(np.int32).cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    rows, columns = np.nonzero(drawn)
    top, bottom = np.maximum(rows - reach, 0), np.minimum(rows + reach + 1, drawn.shape[0])
    left, right = np.maximum(columns - reach, 0), np.minimum(columns + reach + 1, drawn.shape[1])
    around = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
    return float(np.mean(around > 1))


def _category_colors(values: pd.Series) -> dict[str, str]:
    return {str(c): CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i, c in enumerate(values.cat.categories)}


def _scatter_figure(points: pd.DataFrame, column: str, colors: dict[str, str], title: str) -> str:
    """A ``<figure>``: the raster of every point coloured by the categories of ``column``, and its legend."""
    import datashader as ds
    import datashader.transfer_functions as tf

    x_range, y_range = padded_bounds(points)
    canvas = ds.Canvas(plot_width=SCATTER_SIZE[0], plot_height=SCATTER_SIZE[1], x_range=x_range, y_range=y_range)
    present = [str(c) for c in points[column].cat.categories]
    key = {c: colors.get(c, CATEGORY_COLORS[i % len(CATEGORY_COLORS)]) for i, c in enumerate(present)}
    counts = canvas.points(points, "x", "y", ds.count_cat(column))
    counts = counts.copy(data=spread_counts(counts.to_numpy(), SCATTER_SPREAD_THRESHOLD, SCATTER_MAX_SPREAD))
    image = tf.set_background(tf.shade(counts, color_key=key, how="eq_hist", min_alpha=SCATTER_MIN_ALPHA), "white")
    buffer = io.BytesIO()
    image.to_pil().convert("RGB").save(buffer, format="PNG")  # lowest y at the bottom, as plotted
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    tally = points[column].value_counts()
    legend = "".join(f'<span class="item"><span class="swatch" style="background:{key[c]}"></span>'
                     f"{html.escape(c)} ({int(tally.get(c, 0)):,})</span>" for c in present[:LEGEND_LIMIT])
    more = f" and {len(present) - LEGEND_LIMIT:,} more" if len(present) > LEGEND_LIMIT else ""
    return (f'<figure class="scatter"><img alt="{html.escape(title)}" src="{uri}" width="{SCATTER_SIZE[0]}" '
            f'height="{SCATTER_SIZE[1]}" style="max-width:100%;height:auto"><figcaption>{html.escape(title)} '
            f"(x {x_range[0]:.3g} to {x_range[1]:.3g}, y {y_range[0]:.3g} to {y_range[1]:.3g})"
            f'<div class="legend">{legend}{more}</div></figcaption></figure>')


# -- the most confident mistakes --------------------------------------------------------------

def mistakes_section(session: RunSession, count: int) -> Section:
    """The ``count`` labeled instances the model got wrong with the highest confidence, each
    with its input and its maps, as the Instance tab shows them."""
    title = "The most confident mistakes"
    if count == 0:
        return Section("mistakes", title, note("None asked for (--mistakes 0)."))
    ids = run_query(session.con, "SELECT instance_id FROM instances WHERE NOT correct "
                                 "ORDER BY confidence DESC, instance_id LIMIT ?", [count])["instance_id"].to_pylist()
    if not ids:
        return Section("mistakes", title, note("The model made no mistake on a labeled instance of this run."))
    influence = _influential_examples(session, ids)
    cards = "".join(mistake_card(session, instance_id, influence) for instance_id in ids)
    what = ("each method's largest values per feature, with the instance's own value of it" if session.reads_features
            else "each token coloured by its value" if session.reads_text
            else "each map over its input in gray, full colour at the ± value in its title (each on its own scale)")
    caption = f"Per instance, {what}: red toward the predicted (wrong) class, blue against."
    return Section("mistakes", f"{title} ({len(ids)})", f'<p class="caption">{caption}</p>{cards}')


def mistake_card(session: RunSession, instance_id, influence: pd.DataFrame | None) -> str:
    record = session.instance(instance_id)
    row, names = record.row, session.class_names
    facts = (f"label <b>{html.escape(names[row['label']])}</b>, predicted <b>{html.escape(names[row['prediction']])}"
             f"</b> with confidence {row['confidence']:.4f}"
             + "".join(f"; {html.escape(c)} = {html.escape(str(row[c]))}" for c in session.metadata_columns))
    if session.reads_features:
        detail = '<div class="grid">' + "".join(
            _contribution_table(method, session.feature_contributions(instance_id, method).head(FEATURES_PER_MISTAKE))
            for method in session.methods) + "</div>"
    elif record.tokens is not None:
        from netloupe.dashboards.app import colored_text  # Panel comes with it: imported for a text run only

        text = record.input if isinstance(record.input, str) else None
        detail = "".join(colored_text(text, record.tokens, values, method)
                         for method, values in record.token_values.items())
    else:
        detail = _map_figures(record)
    return (f'<div class="mistake" id="instance-{html.escape(str(instance_id))}"><h3>Instance '
            f"{html.escape(str(instance_id))}</h3><p>{facts}</p>{detail}{_influence_figures(session, instance_id, influence)}</div>")


def _influential_examples(session: RunSession, ids: list) -> pd.DataFrame | None:
    """The strongest proponents and opponents of each of ``ids`` with the training examples
    themselves (one read of the training set for all), when the run computed influence."""
    info = session.manifest.influence
    if info is None:
        return None
    frame = influential_examples_of(session.layout.influence_path, info, ids).to_pandas()
    return frame[frame["rank"] <= INFLUENTIAL_PER_SIGN]


def _influence_figures(session: RunSession, instance_id, influence: pd.DataFrame | None) -> str:
    """The instance's strongest proponents and opponents in the training set (TracIn): which
    training examples pushed the model to this mistake."""
    if influence is None:
        return ""
    info = session.manifest.influence
    shown = influence[influence["instance_id"] == instance_id]
    inputs = info.training_input_columns
    figures = []
    for row in shown.itertuples():
        known = getattr(row, "train_label", None)  # none: the training example is gone from its set
        label = session.class_names[int(known)] if known is not None and pd.notna(known) else "?"
        caption = f"{row.sign} #{row.rank}: {label} ({row.score:.3g})"
        values = getattr(row, inputs[0], None) if len(inputs) == 1 and inputs[0] in shown else None
        if values is None:
            figures.append(f"<figure><figcaption>{html.escape(caption)}, train id {row.train_id}</figcaption></figure>")
            continue
        shape = session.manifest.preprocess.shape
        array = np.asarray(values, np.float32)
        image = array.reshape(shape) if shape and int(np.prod(shape)) == array.size else array.reshape(1, -1)
        figures.append(_image_figure(_input_pixels(image), caption))
    if not figures:
        return ""
    return (f'<p class="caption">Its most influential training examples (TracIn, of the loss at the '
            f'{"label" if info.target == "label" else "predicted class"}):</p><div class="grid">{"".join(figures)}</div>')


def _map_figures(record) -> str:
    """The input (when the dataset is still where the run read it) and every method's map over it."""
    figures, picture = [], None
    if isinstance(record.input, np.ndarray):
        picture = map_image(record.input)
        figures.append(_image_figure(_input_pixels(record.input), "input"))
    elif isinstance(record.input, dict):
        figures.append(table(pd.DataFrame({"column": list(record.input), "value": list(record.input.values())})))
    for method, values in record.maps.items():
        image = map_image(values)
        if image.shape[0] == 1:  # a vector: one value per feature
            labels = [f"feature {i}" for i in range(image.shape[1])]
            figures.append(_contribution_table(method, pd.DataFrame({"shown": labels, "attribution": image[0]})))
            continue
        bound = float(np.nanmax(np.abs(image))) if image.size else 0.0
        bound = bound or 1.0
        segments = record.segments.get(method)
        pixels = (blended_map(picture, image, bound, segments) if picture is not None
                  else signed_pixels(image, bound, segments))
        figures.append(_image_figure(pixels, f"{method} (±{bound:.3g})"))
    if not figures:
        return note("This instance has no stored maps (attributions stored as summaries).")
    if picture is None and record.maps:
        figures.append(note("The dataset is no longer where the run read it: the maps are shown without their input."))
    return f'<div class="grid">{"".join(figures)}</div>'


def signed_pixels(values: np.ndarray, bound: float, segments: np.ndarray | None = None) -> np.ndarray:
    """A map on white without its input: red toward the class, blue against, full colour at
    ``bound`` (the colours of :func:`blended_map`). ``(h, w)`` → ``(h, w, 3)`` uint8."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    alpha = np.clip(np.abs(values) / (bound or 1.0), 0, 1)[..., None]
    colour = np.where(values[..., None] > 0, TOWARD, AGAINST)
    pixels = np.round((1 - alpha) * 255 + alpha * colour).astype(np.uint8)
    if segments is not None and np.shape(segments) == values.shape:
        pixels[segment_boundaries(segments)] = BOUNDARY
    return pixels


def _input_pixels(values: np.ndarray) -> np.ndarray:
    """An input image as shown: its colours for three channels, else gray (channels summed), stretched to 0-255."""
    array = np.asarray(values, np.float64)
    image = np.moveaxis(array, 0, -1) if array.ndim == 3 and array.shape[0] == 3 else map_image(array)
    low, high = np.nanmin(image), np.nanmax(image)
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.round(255 * np.nan_to_num(scaled)).astype(np.uint8)


def _image_figure(pixels: np.ndarray, caption: str) -> str:
    # Enlarged by whole pixels here: mail clients and wikis may drop the CSS that keeps them sharp.
    factor = max(1, MAP_PIXELS // max(pixels.shape[:2]))
    enlarged = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    return (f'<figure><img alt="{html.escape(caption)}" src="{png_uri(enlarged)}" width="{enlarged.shape[1]}" '
            f'height="{enlarged.shape[0]}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _contribution_table(method: str, frame: pd.DataFrame) -> str:
    """Values per feature as signed bars (red toward the explained class, blue against)."""
    values = frame["attribution"].to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(values))) if len(values) else 0.0
    bound = bound or 1.0
    rows = []
    for shown, value in zip(frame["shown"], values):
        width = 0.0 if not np.isfinite(value) else 50 * min(1.0, abs(value) / bound)
        colour = "rgb({},{},{})".format(*(TOWARD if value > 0 else AGAINST))
        left = 50 - width if value < 0 else 50
        bar = (f'<span style="position:relative;display:block;height:0.8em;background:#f2f2f2">'
               f'<span style="position:absolute;left:{left:.1f}%;width:{width:.1f}%;height:100%;background:{colour}">'
               "</span></span>")
        rows.append(f"<tr><td>{html.escape(str(shown))}</td><td class='number'>{value:.4g}</td>"
                    f"<td class='bars'>{bar}</td></tr>")
    return (f'<table class="contribution"><tr><th colspan="3">{html.escape(method)}</th></tr>'
            + "".join(rows) + "</table>")


# -- pieces -----------------------------------------------------------------------------------

def png_uri(pixels: np.ndarray) -> str:
    """A ``data:`` URI of an image (``(H, W)`` gray or ``(H, W, 3)`` RGB, uint8) as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_uri(figure) -> str:
    """A ``data:`` URI of a Matplotlib figure as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def table(frame: pd.DataFrame, code: tuple[str, ...] = ()) -> str:
    """A frame as a plain HTML table, numbers right-aligned to 4 significant digits, ``code`` columns as code."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values):
            if column in code:
                cells.append(f"<td><code>{html.escape(str(value))}</code></td>")
            elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                cells.append(f"<td class='number'>{_number(value)}</td>")
            else:
                cells.append(f"<td>{html.escape('–' if value is None else str(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _number(value) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):.4g}"


def _has_labels(session: RunSession) -> bool:
    return bool(run_query(session.con, "SELECT count(label) AS n FROM instances")["n"][0].as_py())


def _model_description(model: dict, manifest) -> str:
    if manifest.handmade:
        return "none (a handmade run)"
    for key, what in (("huggingface", "Hugging Face checkpoint"), ("torchscript", "TorchScript"),
                      ("factory", "factory")):
        if model.get(key):
            weights = f", weights {model['weights']}" if model.get("weights") else ""
            return f"{what} {model[key]}{weights}; output: {manifest.model_identity.output}"
    return f"output: {manifest.model_identity.output}"


def _dataset_description(dataset: dict, manifest) -> str:
    source = dataset.get("source") or manifest.dataset.path or "not recorded"
    column = manifest.dataset.input_column or manifest.dataset.text_column
    if column:
        return f"{source} (input column {column})"
    if manifest.dataset.feature_columns:
        return f"{source} ({len(manifest.dataset.feature_columns):,} feature columns)"
    return str(source)


def _listed(items: list[str], limit: int = 20) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit:,} more" if len(items) > limit else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _netloupe_version() -> str:
    try:
        return version("netloupe")
    except PackageNotFoundError:
        return "(not installed)"
