"""Packaging: the import packages come from this checkout, the `lego` console script
is installed and complete, and the emulated path never imports torch.

Each check runs in a fresh interpreter started from a directory outside the checkout,
so neither pytest's rootdir insertion nor the current directory can mask what an
installed environment would actually import.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["broker", "actors", "scheduler", "clients"]
SUBCOMMANDS = ["broker", "agent", "actor", "up", "generate", "workflows", "status", "models", "bench", "gateway"]
LEGO = Path(sys.executable).parent / "lego"


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # only what is installed in this interpreter's environment
    env.pop("LEGO_BROKER", None)
    return env


def _python(code: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(60)
def test_packages_import_from_this_checkout(tmp_path):
    code = (
        "import importlib, json, sys\n"
        f"names = {PACKAGES!r}\n"
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(files) == set(PACKAGES)
    for name, file in files.items():
        assert file is not None, f"{name} is a namespace package, not this checkout's package"
        path = Path(file).resolve()
        assert path.is_relative_to(REPO), f"{name} imported from {path}, not from {REPO}"
        assert path == REPO / name / "__init__.py"


@pytest.mark.timeout(60)
def test_package_data_is_installed(tmp_path):
    # the built-in catalog and the execution profiles are read as package resources
    code = (
        "from importlib import resources\n"
        "print(len(resources.files('broker').joinpath('catalog/builtin.toml').read_text()))\n"
        "print(sorted(p.name for p in resources.files('broker.costs').joinpath('h800').iterdir()"
        " if p.name.endswith('.json'))[:1])\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    size, profiles = proc.stdout.strip().splitlines()
    assert int(size) > 0
    assert profiles != "[]"


@pytest.mark.timeout(60)
def test_lego_console_script_is_installed_and_lists_subcommands(tmp_path):
    assert LEGO.is_file(), f"no lego console script next to {sys.executable}"
    assert os.access(LEGO, os.X_OK)
    proc = subprocess.run([str(LEGO), "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: lego" in proc.stdout
    for name in SUBCOMMANDS:
        assert name in proc.stdout, f"`lego --help` does not list {name}"
    # the choices line lists every subcommand
    choices = re.search(r"\{([a-z,]+)\}", proc.stdout)
    assert choices, proc.stdout
    listed = choices.group(1).split(",")
    assert set(SUBCOMMANDS) <= set(listed)


@pytest.mark.timeout(60)
def test_lego_without_subcommand_fails(tmp_path):
    proc = subprocess.run([str(LEGO)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "usage: lego" in proc.stderr


@pytest.mark.timeout(60)
def test_emulated_backend_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "import actors.backends.emulated\n"
        "from actors.backends import create_backend\n"
        "from broker.catalog import load_catalog\n"
        "backend = create_backend('emulated', load_catalog().models['Flux1Schnell'], 'cpu', {'time_scale': 0})\n"
        "backend.load()\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.timeout(60)
def test_lego_workflows_offline_json(tmp_path):
    proc = subprocess.run([str(LEGO), "workflows", "--offline", "--json"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    infos = json.loads(proc.stdout)
    by_name = {w["name"]: w for w in infos}
    assert "flux-schnell-txt2img" in by_name
    flux = by_name["flux-schnell-txt2img"]
    assert flux["models"] == ["CLIP_Flux", "T5_Flux", "Flux1Schnell", "Flux1VAE"]
    assert flux["inputs"]["prompt"]["required"] is True
    assert flux["inputs"]["steps"]["default"] == 4


@pytest.mark.timeout(60)
def test_lego_workflows_offline_does_not_import_torch(tmp_path):
    # the same command through the console script's entry point, in one interpreter
    code = (
        "import io, sys, contextlib\n"
        "from clients.cli.commands import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['workflows', '--offline', '--json'])\n"
        "    except SystemExit as exc:\n"
        "        code = exc.code\n"
        "    else:\n"
        "        code = 0\n"
        "print(code)\n"
        "print('flux-schnell-txt2img' in out.getvalue())\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    code, has_flux, torch_modules = proc.stdout.strip().splitlines()[-3:]
    assert code in ("0", "None")
    assert has_flux == "True"
    assert torch_modules == "[]"
