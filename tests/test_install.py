"""Packaging: `pip install .` with build isolation builds the C extension into a fresh virtual
environment; without a compiler, or with the extension switched off, the package still imports
and runs the pure-torch reference."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")

CHECK = """
import glofnd, torch
print(glofnd.__file__)
print(glofnd.implementation)
fnd = glofnd.GloFND(4, alpha=0.5, init_lambda=0.5)
print(int(fnd(torch.tensor([[0.9, -0.9], [0.2, 0.1]]), torch.tensor([0, 1])).sum()))
"""


def copy_tree(dst: Path) -> Path:
    """The source tree without build products, so that nothing prebuilt is reused."""
    src = dst / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache", "out"))
    return src


def install(tmp_path: Path, env_extra: dict) -> tuple[Path, str]:
    """pip install (isolated build) into a fresh venv; returns its python and the check output.
    The venv sees the running interpreter's torch through a .pth line, not its glofnd."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    torch_site = Path(torch.__file__).parents[1]
    Path(site, "outer_torch.pth").write_text(f"{torch_site}\n")
    env = {**os.environ, **env_extra}
    env.pop("GLOFND_WERROR", None)
    env.pop("PYTHONPATH", None)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(copy_tree(tmp_path))],
                   check=True, env=env, cwd=tmp_path)
    out = subprocess.run([py, "-c", CHECK], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.split()
    return Path(site), out


@pytest.mark.slow
def test_pip_install_builds_the_extension(tmp_path):
    site, (path, impl, flagged) = install(tmp_path, {})
    assert Path(path).is_relative_to(site)
    assert impl == "c"
    assert list((site / "glofnd").glob("_C*.so"))
    assert flagged == "1"  # only 0.9 lies above λ ≈ 0.45 after one step from 0.5


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"GLOFND_NO_EXTENSION": "1"}, {"CC": "/bin/false"}],
                         ids=["switched-off", "no-compiler"])
def test_install_without_extension_uses_reference(tmp_path, env):
    site, (path, impl, flagged) = install(tmp_path, env)
    assert Path(path).is_relative_to(site)
    assert impl == "reference"
    assert not list((site / "glofnd").glob("_C*.so"))
    assert flagged == "1"
