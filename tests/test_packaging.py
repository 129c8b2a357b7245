"""What `pip install .` puts in site-packages: one top-level name, `edgeinfer`, with the
repository's export/, native/ and devices/ folders inside it, and everything the runtime
reads at run time (device profiles, the C reader's source, the demo model)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "fixtures", "build", "*.egg-info", "__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{p.stdout}\n{p.stderr}")
    (whl,) = out.glob("edgeinfer-*.whl")
    return whl


def test_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"edgeinfer"}
    for needed in ("edgeinfer/export/exporter.py", "edgeinfer/export/archs/llama.py", "edgeinfer/export/calibration.txt",
                   "edgeinfer/native/fastread.c", "edgeinfer/devices/jetson-orin-nano-8gb.toml",
                   "edgeinfer/demo/model.onnx", "edgeinfer/demo/manifest.json"):
        assert needed in names, needed


def test_installed_wheel_runs_without_the_checkout(wheel, tmp_path):
    """Installed alone (no checkout on sys.path), the subpackages import and find their data."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import edgeinfer, edgeinfer.export.archs, edgeinfer.native.loader; "
            "from edgeinfer.devices.profiles import list_profiles; "
            "assert edgeinfer.__file__.startswith(sys.argv[1]), edgeinfer.__file__; "
            "assert 'jetson-orin-nano-8gb' in list_profiles(); "
            "import importlib.util as u; assert u.find_spec('export') is None and u.find_spec('native') is None; "
            "print(edgeinfer.load().generate('Once upon a time', max_new_tokens=4))")
    p = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()
