"""netloupe installs under one top-level name, and its old module paths say where they went."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from netloupe.contract.errors import ModelError
from netloupe.contract.spec import ModelSpec
from netloupe.workers.model_loading import load_model

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "netloupe", "contract", "storage", "workers", "pipeline", "dashboards")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from the sources (copied, so the build leaves nothing in the repository)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                             if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    [built] = out.glob("netloupe-*.whl")
    return built


def test_the_wheel_holds_one_top_level_name_and_the_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"netloupe", wheel.name.split("-py3")[0] + ".dist-info"}
    for data in ("netloupe/storage/sql/operators.sql", "netloupe/dashboards/login.html", "netloupe/contract/spec.py"):
        assert data in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "netloupe = netloupe.pipeline.cli:main" in entry_points


def test_installed_from_the_wheel_it_imports_as_netloupe_only(wheel, tmp_path):
    """Installed beside other packages named pipeline or storage, netloupe takes neither name."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    (tmp_path / "site" / "pipeline").mkdir()  # a user's own package of that name
    (tmp_path / "site" / "pipeline" / "__init__.py").write_text("OWNER = 'user'\n")
    check = ("import netloupe.storage.catalog as c, netloupe.pipeline.cli, pipeline; "
             "print(c.__file__); print(pipeline.OWNER); print(sorted(p.name for p in c.SQL_DIR.glob('*.sql')))")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    catalog_file, owner, sql = done.stdout.splitlines()
    assert catalog_file.startswith(str(tmp_path / "site" / "netloupe" / "storage"))
    assert owner == "user" and sql == "['build.sql', 'building_blocks.sql', 'compare.sql', 'fast.sql', 'feature_view.sql', 'influence.sql', 'merge.sql', 'operators.sql', 'tables.sql', 'token_view.sql']"


def test_a_model_factory_in_the_old_spelling_names_the_new_one():
    with pytest.raises(ModelError, match=r"old path.*write 'netloupe\.pipeline\.zoo:trained_mnist_cnn'"):
        load_model(ModelSpec(factory="pipeline.zoo:trained_mnist_cnn"))
