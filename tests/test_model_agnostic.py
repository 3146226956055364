"""Model-agnostic and rule-based methods on tabular runs, against hand arithmetic and Captum.

The data has two numbers and one categorical (``color``, three one-hot columns grouped as one
feature). For the linear model logit_c = W[c]·x + B[c], which ignores x1, every perturbation
method has a closed form: a feature's (group's) attribution is the sum over its columns of
W[c, j] (x_j - b_j), against a constant baseline b (feature ablation, Shapley sampling:
exact) or, against a background set, b_j = the background's mean of column j (Kernel SHAP:
exact on an additive model, whatever its samples).
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from captum.attr import LRP, DeepLiftShap, FeatureAblation, GuidedBackprop, KernelShap, Lime, ShapleyValueSampling
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, GammaRule

from netloupe.contract.errors import MethodError
from netloupe.contract.spec import parse_spec
from netloupe.dashboards.session import BOUNDARY, RunSession, blended_map, segment_boundaries
from netloupe.pipeline.datasets import resolve_dataset
from netloupe.pipeline.driver import run_job, validate
from netloupe.pipeline.run_background import draw_background
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from netloupe.workers.explain import batch_seed
from netloupe.workers.kernel_shap import BatchedKernelShap
from tests.tiny_models import GROUPED_W, grouped_mlp

COLUMNS = ["x0", "x1", "color=blue", "color=green", "color=red"]
GROUPS = {"color": ["color=blue", "color=green", "color=red"]}
FEATURES = ["x0", "x1", "color"]
MEMBERS = [[0], [1], [2, 3, 4]]
COLORS = np.array(["blue", "green", "red"])
SEED = 11


def grouped_table(n: int = 40, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    numbers = rng.normal(size=(n, 2)).astype(np.float32) * 2
    color = rng.integers(0, 3, n)
    columns = {"row_id": pa.array(np.arange(500, 500 + n, dtype=np.int64)), "x0": numbers[:, 0], "x1": numbers[:, 1]}
    for j, name in enumerate(COLORS):
        columns[f"color={name}"] = (color == j).astype(np.float32)
        columns[f"color={name}"][7] = 0.0  # a person of no listed colour: no category, not an error
    columns["label"] = pa.array(rng.integers(0, 2, n).astype(np.int64))
    names = COLORS[color].astype(object)
    names[7] = "none"
    columns["color"] = pa.array(names)
    return pa.table(columns)


def _matrix(table: pa.Table) -> np.ndarray:
    return np.stack([table[c].to_numpy() for c in COLUMNS], axis=1).astype(np.float64)


def _spec(path, root, factory: str, attributions: list, name: str, **extra) -> dict:
    return {**{
        "model": {"factory": f"tests.tiny_models:{factory}"},
        "dataset": {"source": str(path), "feature_columns": COLUMNS, "feature_groups": GROUPS,
                    "id_column": "row_id", "metadata_columns": ["color"]},
        "attributions": attributions,
        "background": {"size": 6, "seed": 3},
        "execution": {"batch_size": 16, "num_workers": 1, "threads_per_worker": 1, "seed": SEED},
        "output": {"root": str(root), "run_name": name}}, **extra}


LINEAR_METHODS = [
    {"method": "feature_ablation"},
    {"method": "feature_ablation", "name": "ablation_mean", "baseline": "mean"},
    {"method": "shapley_value_sampling", "params": {"n_samples": 3}},
    {"method": "kernel_shap", "baseline": "background", "params": {"n_samples": 40}},
    {"method": "integrated_gradients", "params": {"n_steps": 8}},
]

MLP_METHODS = [
    {"method": "kernel_shap", "baseline": "background", "params": {"n_samples": 30}},
    {"method": "lime", "params": {"n_samples": 30}},
    {"method": "shapley_value_sampling", "params": {"n_samples": 2}},
    {"method": "deeplift_shap", "baseline": "background"},
    {"method": "guided_backprop"},
    # Rules before the defaults: each LRP's rules are set anew before every call (Captum
    # deletes them all after one), so neither leaks into the other.
    {"method": "lrp", "name": "lrp_rules", "rules": {"Linear": {"rule": "gamma", "gamma": 0.5},
                                                    "head": {"rule": "alpha1_beta0"}}},
    {"method": "lrp"},
]


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("agnostic")
    pq.write_table(grouped_table(), root / "data.parquet")
    linear = run_job(parse_spec(_spec(root / "data.parquet", root / "runs", "grouped_linear", LINEAR_METHODS, "lin")))
    # One Captum call per batch (a sampling method draws anew per call), whatever chunk the worker measures.
    mlp = run_job(parse_spec(_spec(root / "data.parquet", root / "runs", "grouped_mlp", MLP_METHODS, "mlp",
                                   execution={"batch_size": 16, "num_workers": 1, "threads_per_worker": 1,
                                              "seed": SEED, "chunk_rows": 65536})))
    return RunReader(linear.layout.root), RunReader(mlp.layout.root), grouped_table()


def _by_id(reader: RunReader, method: str, column: str = "feature_attribution") -> tuple[pa.Table, np.ndarray]:
    rows = reader.attributions(method).sort_by("instance_id")
    return rows, vectors_to_numpy(rows[column]).astype(np.float64)


def _expected(x: np.ndarray, target: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per feature, the sum over its columns of W[target, j] (x_j - b_j)."""
    w = np.array(GROUPED_W)[target]
    per_column = w * (x - baseline)
    return np.stack([per_column[:, m].sum(axis=1) for m in MEMBERS], axis=1)


def test_the_background_is_the_same_rows_whatever_the_files(tmp_path):
    """The background is drawn by a seeded hash of the ids: the same instances whether the data is
    one file or three files in another order; stored with the run (checked in the next test)."""
    table = grouped_table()
    pq.write_table(table, tmp_path / "one.parquet")
    (tmp_path / "split").mkdir()
    order = np.random.default_rng(1).permutation(table.num_rows)
    for i, rows in enumerate(np.array_split(order, 3)):
        pq.write_table(table.take(rows), tmp_path / "split" / f"{i}.parquet")
    drawn = []
    for source in (tmp_path / "one.parquet", tmp_path / "split"):
        spec = parse_spec(_spec(source, tmp_path / "runs", "grouped_linear", LINEAR_METHODS, "b"))
        drawn.append(draw_background(spec, resolve_dataset(spec)))
    assert drawn[0]["row_id"].to_pylist() == drawn[1]["row_id"].to_pylist()
    assert len(set(drawn[0]["row_id"].to_pylist())) == 6
    other = parse_spec(_spec(tmp_path / "one.parquet", tmp_path / "runs", "grouped_linear", LINEAR_METHODS, "b",
                             background={"size": 6, "seed": 4}))
    assert draw_background(other, resolve_dataset(other))["row_id"].to_pylist() != drawn[0]["row_id"].to_pylist()


def test_perturbation_methods_on_a_linear_model_are_exact_per_feature(runs):
    linear, _, table = runs
    x = _matrix(table)
    background = _matrix(linear.background())
    assert linear.background().num_rows == 6
    cases = {"feature_ablation": np.zeros(5), "ablation_mean": background.mean(axis=0),
             "shapley_value_sampling": np.zeros(5), "kernel_shap": background.mean(axis=0)}
    for method, baseline in cases.items():
        rows, got = _by_id(linear, method)
        target = rows["target"].to_numpy()
        np.testing.assert_allclose(got, _expected(x, target, baseline), atol=2e-4, err_msg=method)
        assert np.abs(got[:, 1]).max() < 1e-4, f"{method}: the model ignores x1"
        # Stored input-shaped as Captum returns it: the group's value on each of its columns.
        _, full = _by_id(linear, method, "attribution")
        np.testing.assert_allclose(full[:, 2:], np.repeat(got[:, 2:3], 3, axis=1), atol=1e-6)


def test_a_gradient_method_s_feature_value_is_the_sum_over_the_group(runs):
    linear, _, table = runs
    rows, got = _by_id(linear, "integrated_gradients")
    _, full = _by_id(linear, "integrated_gradients", "attribution")
    np.testing.assert_allclose(got, np.stack([full[:, m].sum(axis=1) for m in MEMBERS], axis=1), atol=1e-6)
    np.testing.assert_allclose(got, _expected(_matrix(table), rows["target"].to_numpy(), np.zeros(5)), atol=1e-4)


def _captum(method: str, model, x: torch.Tensor, target: torch.Tensor, background: torch.Tensor,
            params: dict) -> torch.Tensor:
    mask = torch.tensor([[0, 1, 2, 2, 2]])
    if method == "kernel_shap":  # the batch shares its coalitions: Captum per instance, same seed
        seed = torch.initial_seed()
        total = torch.zeros_like(x)
        for i in range(len(x)):
            for b in background:
                torch.manual_seed(seed)
                total[i] += KernelShap(model).attribute(x[i : i + 1], baselines=b[None], target=int(target[i]),
                                                        feature_mask=mask, **params)[0]
        return total / len(background)
    if method == "lime":
        return Lime(model).attribute(x, target=target, baselines=0.0, feature_mask=mask, **params)
    if method == "shapley_value_sampling":
        return ShapleyValueSampling(model).attribute(x, target=target, baselines=0.0, feature_mask=mask, **params)
    if method == "deeplift_shap":
        return DeepLiftShap(model).attribute(x.requires_grad_(), target=target, baselines=background)
    if method == "guided_backprop":
        return GuidedBackprop(model).attribute(x.requires_grad_(), target=target)
    if method == "lrp_rules":  # the spec's rules, set by hand as Captum's docs do
        model.fc1.rule, model.head.rule = GammaRule(gamma=0.5), Alpha1_Beta0_Rule()
    return LRP(model).attribute(x.requires_grad_(), target=target)


@pytest.mark.parametrize("entry", MLP_METHODS, ids=lambda e: e.get("name", e["method"]))
def test_stored_values_equal_captum_called_directly(runs, entry):
    """Per part (one batch), Captum on that batch with the seed netloupe derives from the part's
    key gives the stored values."""
    _, mlp, table = runs
    method = entry.get("name", entry["method"])
    model = grouped_mlp().eval()
    background = torch.from_numpy(_matrix(mlp.background()).astype(np.float32))
    by_id = {key: i for i, key in enumerate(table["row_id"].to_pylist())}
    x_all = _matrix(table).astype(np.float32)
    parts = sorted(mlp.layout.attributions_dir(method).glob("part-*.parquet"))
    assert len(parts) >= 2
    for part in parts:
        stored = pq.read_table(part)
        key = part.name[len("part-"):-len(".parquet")]
        x = torch.from_numpy(x_all[[by_id[k] for k in stored["instance_id"].to_pylist()]])
        target = torch.from_numpy(stored["target"].to_numpy())
        torch.manual_seed(batch_seed(SEED, key, method))
        np.random.seed(batch_seed(SEED, key, method) % 2**32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _captum(method, model, x, target, background, entry.get("params", {})).detach().numpy()
        got = vectors_to_numpy(stored["attribution"]).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5, err_msg=method)


def test_lrp_rules_chosen_in_the_spec_change_the_map(runs):
    _, mlp, _ = runs
    _, ruled = _by_id(mlp, "lrp_rules", "attribution")
    _, default = _by_id(mlp, "lrp", "attribution")
    assert np.abs(ruled - default).max() > 1e-2


@pytest.mark.parametrize("rule, expected", [
    ({"rule": "epsilon"}, [2.0, -2.0, 3.0]),  # x_i w_i
    ({"rule": "alpha1_beta0"}, [1.2, 0.0, 1.8]),  # x_i w_i⁺ / Σ x_j w_j⁺ · y: positive parts only
    ({"rule": "gamma", "gamma": 1.0}, [1.5, -0.75, 2.25]),  # x_i (w_i + γw_i⁺) · y / Σ_j: (4, -2, 6) · 3/8
])
def test_lrp_rules_by_hand_on_one_linear_layer(rule, expected):
    """y = w·x with w = (1, -2, 3), x = (2, 1, 1), y = 3: each rule's relevances by hand, and
    they add up to y; in every Captum call of a batch (Captum deletes rules after each)."""
    from netloupe.contract.spec import MethodSpec
    from netloupe.workers.methods import bind_method

    model = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0]]))
    # One row per Captum call (chunk_rows 1): the rules must hold in every call, not the first only.
    bound = bind_method(MethodSpec(method="lrp", rules={"Linear": rule}), model, (3,), chunk_rows=1)
    x, target = torch.tensor([[2.0, 1.0, 1.0], [4.0, 2.0, 2.0]]), torch.tensor([0, 0])
    got, delta = bound(x, target)
    # Every rule here is linear in x (y doubles with it): the second row is twice the first.
    np.testing.assert_allclose(got.detach().numpy(), [expected, [2 * v for v in expected]], atol=1e-5)
    assert got.detach().sum(dim=1).tolist() == pytest.approx([3.0, 6.0], abs=1e-5)


def test_kernel_shap_converges_to_the_exact_shapley_values_of_a_nonlinear_model():
    """Three features: the exact values by enumerating the coalitions, against a background;
    the batched estimate's error shrinks as samples grow, and it adds up to f(x) - E f(b)."""
    from itertools import combinations
    from math import factorial

    model = grouped_mlp().eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32))
    background = torch.from_numpy(rng.normal(size=(5, 5)).astype(np.float32))
    mask = torch.tensor([[0, 1, 2, 2, 2]])
    target = torch.tensor([0, 1, 0, 1])

    def value(i: int, coalition: tuple[int, ...]) -> float:
        keep = torch.tensor([float(g in coalition) for g in (0, 1, 2, 2, 2)])
        rows = x[i] * keep + background * (1 - keep)
        with torch.no_grad():
            return model(rows)[:, target[i]].mean().item()

    exact = np.zeros((4, 3))
    for i in range(4):
        for g in range(3):
            others = [h for h in range(3) if h != g]
            for size in range(3):
                for subset in combinations(others, size):
                    weight = factorial(size) * factorial(3 - size - 1) / factorial(3)
                    exact[i, g] += weight * (value(i, subset + (g,)) - value(i, subset))
    errors = []
    for samples in (50, 5000):
        torch.manual_seed(0)
        got = BatchedKernelShap(model).attribute(x, baselines=background, target=target, feature_mask=mask,
                                                 n_samples=samples, return_input_shape=False).numpy()
        errors.append(np.abs(got - exact).max())
        with torch.no_grad():
            gap = (model(x).gather(1, target[:, None])[:, 0] - model(background)[:, target].mean(dim=0)).numpy()
        # Captum enforces completeness by a weight of 1e6 on the empty and the full coalition,
        # not exactly: the residue grows with the samples (4e-5 of the output at 5,000).
        np.testing.assert_allclose(got.sum(axis=1), gap, rtol=1e-3, atol=1e-3)
    assert errors[1] < 0.02 * np.abs(exact).max() and errors[1] < errors[0] / 3


def test_the_long_feature_view_and_its_operators(runs):
    linear, _, table = runs
    rows, values = _by_id(linear, "kernel_shap")
    con = open_catalog(linear.layout.root)
    view = run_query(con, "SELECT * FROM feature_attributions_kernel_shap ORDER BY instance_id, feature")
    assert view.num_rows == table.num_rows * 3
    first = view.filter(pa.compute.equal(view["instance_id"], 500)).to_pylist()
    assert [r["feature"] for r in first] == ["color", "x0", "x1"]
    assert first[0]["category"] == table["color"][0].as_py() and first[0]["value"] is None
    assert first[1]["value"] == pytest.approx(table["x0"][0].as_py()) and first[1]["category"] is None
    colourless = view.filter(pa.compute.equal(view["instance_id"], 507)).to_pylist()[0]
    assert colourless["feature"] == "color" and colourless["category"] is None
    # Global importance: mean |attribution| per feature, over a subset.
    red = (table["color"].to_numpy(zero_copy_only=False) == "red")
    importance = {r["feature"]: r for r in run_query(
        con, "SELECT * FROM feature_importance('kernel_shap', 'color = ''red''')").to_pylist()}
    for j, feature in enumerate(FEATURES):
        assert importance[feature]["mean_abs"] == pytest.approx(np.abs(values[red, j]).mean(), rel=1e-5)
        assert importance[feature]["instances"] == red.sum()
    order = [r["feature"] for r in run_query(con, "SELECT * FROM feature_importance('kernel_shap')").to_pylist()]
    assert order[-1] == "x1"  # the ignored feature comes last
    difference = {r["feature"]: r["difference"] for r in run_query(
        con, "SELECT * FROM feature_importance_difference('kernel_shap', 'color = ''red''', 'color <> ''red''')"
    ).to_pylist()}
    assert difference["x0"] == pytest.approx(np.abs(values[red, 0]).mean() - np.abs(values[~red, 0]).mean(), rel=1e-5)
    by_class = run_query(con, "SELECT * FROM feature_importance_by('kernel_shap', 'prediction')")
    assert set(by_class["subset"].to_pylist()) == {f"prediction={p}" for p in set(linear.instances()["prediction"].to_pylist())}
    dependence = run_query(con, "SELECT * FROM feature_dependence('kernel_shap', 'x0', k := 10)")
    assert dependence.num_rows == 10
    x0 = dict(zip(table["row_id"].to_pylist(), table["x0"].to_pylist()))
    for r in dependence.to_pylist():
        assert r["value"] == pytest.approx(x0[r["instance_id"]])


def test_methods_that_cannot_run_are_refused_before_any_worker(ray_local, tmp_path):
    pq.write_table(grouped_table(), tmp_path / "data.parquet")
    path = tmp_path / "data.parquet"
    cases = [
        ("flatten_linear", [{"method": "lrp"}], "no LRP rule"),
        ("grouped_linear", [{"method": "integrated_gradients", "baseline": "background"}], "baseline 'background'"),
        ("grouped_linear", [{"method": "kernel_shap", "params": {"feature_mask": [0, 0, 1, 1, 1]}}],
         "feature_mask"),
        ("grouped_mlp", [{"method": "lrp", "rules": {"fc2": {"rule": "gamma"}}}], "no module path or class.*'fc1'"),
        ("grouped_mlp", [{"method": "lrp", "rules": {"relu": {"rule": "gamma"}}}], "passes relevance through 'relu'"),
        ("grouped_mlp", [{"method": "saliency", "rules": {"fc1": {"rule": "gamma"}}}], "saliency has none"),
    ]
    for factory, methods, message in cases:
        spec = parse_spec(_spec(path, tmp_path / "runs", factory, methods, "bad"))
        with pytest.raises(MethodError, match=message):
            validate(spec)
        assert not (tmp_path / "runs" / "bad").exists()
    one_row = parse_spec(_spec(path, tmp_path / "runs", "grouped_mlp", [{"method": "deeplift_shap", "baseline": "background"}],
                               "bad", background={"size": 1}))
    with pytest.raises(MethodError, match="at least two background rows"):
        validate(one_row)
    bad_groups = _spec(path, tmp_path / "runs", "grouped_linear", LINEAR_METHODS, "bad")
    bad_groups["dataset"]["feature_groups"] = {"color": ["color=blue", "colour=red"]}
    with pytest.raises(Exception, match="colour=red"):
        resolve_dataset(parse_spec(bad_groups))


def test_the_dashboard_s_feature_views_show_the_stored_values(runs):
    """The session behind the Features tab and the instance detail of a tabular run: one
    instance's values per feature with its original values, the importance per class and the
    dependence, each equal to the stored values."""

    linear, _, table = runs
    session = RunSession(linear.layout.root)
    assert session.features["feature"].tolist() == FEATURES
    rows, values = _by_id(linear, "kernel_shap")
    first = session.feature_contributions(500, "kernel_shap")
    expected = dict(zip(FEATURES, values[0]))
    assert first["attribution"].tolist() == pytest.approx(sorted(expected.values(), key=lambda v: -abs(v)), abs=1e-6)
    shown = dict(zip(first["feature"], first["shown"]))
    assert shown["color"] == f"color = {table['color'][0].as_py()}"
    assert shown["x0"] == f"x0 = {table['x0'][0].as_py():.4g}"
    importance = session.feature_importance("kernel_shap", "prediction")
    predictions = linear.instances().sort_by("instance_id")["prediction"].to_numpy()
    for p in set(predictions.tolist()):
        part = importance[importance["subset"] == f"prediction={p}"].set_index("feature")
        for j, feature in enumerate(FEATURES):
            assert part.loc[feature, "mean_abs"] == pytest.approx(np.abs(values[predictions == p, j]).mean(), rel=1e-5)
    session.add_predicate_subset("reds", "color = 'red'")
    kept = session.feature_importance("kernel_shap", "reds")
    assert set(kept["subset"]) == {"reds"} and kept["instances"].max() == (table["color"].to_numpy(zero_copy_only=False) == "red").sum()
    dependence = session.feature_dependence("kernel_shap", "color")
    assert len(dependence) == table.num_rows
    assert set(dependence["category"].dropna()) == set(table["color"].to_pylist()) - {"none"}
    with pytest.raises(Exception, match="did you mean"):
        session.feature_dependence("kernel_shap", "colour")


def test_the_features_tab_and_a_tabular_instance_draw_their_bars(runs, tmp_path):
    """In Chromium: the Features tab draws each predicted class's bars and a categorical's
    dependence; a tabular instance draws one bar chart per method beside its probabilities.
    Each chart has colour over a real share of its canvas (a chart collapsed into its corner
    has none: Bokeh figures in a FlexBox of a tab built on opening did that)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from tests.helpers import wait_until
    from tests.test_dashboard_browser import (
        ARTIFACTS,
        CHROMIUM,
        colored,
        open_tab,
        start_dashboard,
        wait_for_plot,
        wait_for_text,
    )

    linear, _, _ = runs
    process, url = start_dashboard(linear.layout.root, tmp_path)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url, wait_until="networkidle")
            page.locator(".bk-tab").first.wait_for(timeout=60_000)  # (no layer recorded: no scatter)
            open_tab(page, "Features")
            wait_for_plot(page, ".feature-bars", timeout=60)
            classes = len(set(linear.instances()["prediction"].to_pylist()))
            figures = page.locator(".feature-bars .bk-Figure")
            assert figures.count() == classes
            for i in range(classes):
                assert colored(figures.nth(i).screenshot()) > 1500, f"bar chart {i} is (nearly) empty"
            page.locator(".dependence-feature select").select_option("color")
            wait_for_plot(page, ".feature-dependence", timeout=60, min_colored=1500)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "tabular-features.png"), full_page=True)
            open_tab(page, "Instance")
            page.locator("input").first.fill("500")
            page.keyboard.press("Enter")
            # The tab opened on the most confident mistake first: wait for instance 500's own detail.
            wait_for_text(page, ".instance-facts", "Instance 500")
            wait_for_plot(page, ".feature-contributions", timeout=60)
            charts = page.locator(".feature-contributions .bk-Figure")
            assert charts.count() == len(LINEAR_METHODS) + 1  # the probabilities, then one per method

            def drawn(i: int) -> bool:
                try:
                    return colored(charts.nth(i).screenshot()) > 500
                except PlaywrightError:  # redrawn while photographed: look again
                    return False

            for i in range(charts.count()):
                wait_until(lambda: drawn(i), 30, f"instance chart {i} drawn", interval=0.5)
            page.screenshot(path=str(ARTIFACTS / "tabular-instance.png"), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


IMAGE_METHODS = [
    {"method": "feature_ablation", "name": "ablation_superpixels",
     "feature_mask": {"kind": "superpixels", "segments": 4, "compactness": 0.1}},
    {"method": "kernel_shap", "name": "kernel_shap_superpixels", "params": {"n_samples": 24},
     "feature_mask": {"kind": "superpixels", "segments": 4, "compactness": 0.1}},
    {"method": "feature_ablation", "name": "ablation_grid", "feature_mask": {"kind": "grid", "cell": [2, 2]}},
]


def test_superpixels_are_slic_s_and_each_image_is_explained_over_its_own(ray_local, tmp_path):
    """An image's features are its SLIC superpixels (scikit-image on the image itself), stored
    per instance; the values equal Captum's with those masks (feature ablation on the batch;
    Kernel SHAP, image after image, adds up to each image's gap and equals Captum's on the
    batch's first image from the part's seed). A grid of 2x2 cells equals Captum with that mask."""
    from skimage.segmentation import slic

    from tests.helpers import image_table
    from tests.tiny_models import tiny_cnn

    table = image_table(24)
    pq.write_table(table, tmp_path / "images.parquet")
    run = RunReader(run_job(parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn"},
        "dataset": {"source": str(tmp_path / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, 4, 4]},
        "attributions": IMAGE_METHODS,
        "execution": {"batch_size": 12, "num_workers": 1, "threads_per_worker": 1, "seed": SEED, "chunk_rows": 65536},
        "output": {"root": str(tmp_path / "runs"), "run_name": "sp"},
    })).layout.root)
    model = tiny_cnn().eval()
    images = vectors_to_numpy(table["pixels"]).reshape(-1, 1, 4, 4).astype(np.float32)
    by_key = {k: i for i, k in enumerate(table["key"].to_pylist())}
    grid = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])[None, None]
    for name in ("ablation_superpixels", "kernel_shap_superpixels", "ablation_grid"):
        for part in sorted(run.layout.attributions_dir(name).glob("part-*.parquet")):
            stored = pq.read_table(part)
            key = part.name[len("part-"):-len(".parquet")]
            x = torch.from_numpy(images[[by_key[k] for k in stored["instance_id"].to_pylist()]])
            target = torch.from_numpy(stored["target"].to_numpy().copy())
            got = vectors_to_numpy(stored["attribution"]).reshape(x.shape)
            if name == "ablation_grid":
                assert "feature_mask" not in stored.column_names
                expected = FeatureAblation(model).attribute(x, target=target, baselines=0.0, feature_mask=grid)
                np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
                continue
            masks = np.stack([slic(image[0], n_segments=4, compactness=0.1, channel_axis=None, start_label=0)
                              for image in x.numpy()])
            assert (vectors_to_numpy(stored["feature_mask"]).reshape(masks.shape) == masks).all()
            mask = torch.from_numpy(masks).long()[:, None]
            if name == "ablation_superpixels":
                expected = FeatureAblation(model).attribute(x, target=target, baselines=0.0, feature_mask=mask)
            else:
                # Each image's segments add up to its output's gap to the baseline (Captum's 1e6
                # weight on the empty and full coalitions)...
                with torch.no_grad():
                    gap = (model(x).gather(1, target[:, None]) - model(torch.zeros_like(x)).gather(1, target[:, None]))[:, 0]
                for i in range(len(x)):
                    per_segment = {int(s): got[i, 0].reshape(-1)[int(np.flatnonzero(masks[i].reshape(-1) == s)[0])]
                                   for s in np.unique(masks[i])}
                    assert sum(per_segment.values()) == pytest.approx(float(gap[i]), abs=1e-3)
                # ... and the first image of the batch is Captum's own from the part's seed (from the
                # second on, Captum's loop also draws for the model it fits per image).
                assert mask[0].max() > 0, "the batch's first image must have segments to draw coalitions of"
                torch.manual_seed(batch_seed(SEED, key, name))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    first = KernelShap(model).attribute(x[:1], baselines=0.0, target=int(target[0]),
                                                        feature_mask=mask[:1], n_samples=24)
                np.testing.assert_allclose(got[:1], first.numpy(), atol=1e-4, err_msg=name)
                continue
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, err_msg=name)
    # The instance view reads each superpixel method's segments with the map, and draws their
    # boundaries (and only theirs) over it; a grid method has none.
    key = table["key"][0].as_py()
    detail = RunSession(run.layout.root).instance(key)
    own = slic(images[by_key[key]][0], n_segments=4, compactness=0.1, channel_axis=None, start_label=0)
    assert sorted(detail.segments) == ["ablation_superpixels", "kernel_shap_superpixels"]
    assert (detail.segments["ablation_superpixels"] == own).all()
    picture = images[by_key[key]][0]
    drawn = blended_map(picture, detail.maps["ablation_superpixels"][0], 1.0, detail.segments["ablation_superpixels"])
    plain = blended_map(picture, detail.maps["ablation_superpixels"][0], 1.0)
    changed = (drawn != plain).any(axis=-1) | (drawn == BOUNDARY).all(axis=-1)
    assert (changed == segment_boundaries(own)).all() and changed.any()
    # Maps stored as pooled heatmaps keep each image's segments at the input's size.
    pooled = RunReader(run_job(parse_spec({
        "model": {"factory": "tests.tiny_models:tiny_cnn"},
        "dataset": {"source": str(tmp_path / "images.parquet"), "input_column": "pixels", "id_column": "key"},
        "preprocess": {"shape": [1, 4, 4]},
        "attributions": IMAGE_METHODS[:1],
        "storage": {"attributions": "heatmap", "heatmap_size": [2, 2]},
        "execution": {"batch_size": 12, "num_workers": 1, "threads_per_worker": 1, "seed": SEED},
        "output": {"root": str(tmp_path / "runs"), "run_name": "pooled"},
    })).layout.root)
    pooled_detail = RunSession(pooled.layout.root).instance(key)
    assert pooled_detail.maps["ablation_superpixels"].shape[-2:] == (2, 2)
    assert (pooled_detail.segments["ablation_superpixels"] == own).all()


def test_segment_boundaries_are_the_pixels_next_to_another_segment():
    segments = np.array([[0, 0, 1],
                         [0, 0, 1],
                         [2, 2, 2]])
    assert segment_boundaries(segments).tolist() == [[False, True, False],
                                                     [True, True, True],
                                                     [False, False, False]]
