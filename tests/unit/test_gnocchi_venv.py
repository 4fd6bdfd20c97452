"""tools/gnocchi_venv.py decides to reuse or rebuild the Gnocchi venv from
its marker (no pip run here: ``build`` is replaced)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tool(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gnocchi_venv",
                                                  ROOT / "tools" / "gnocchi_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("CLOUDKITTY_PROC_CACHE", str(tmp_path / "cache"))
    builds = []

    def fake_build(venv):
        builds.append(venv)
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        for name in module.EXECUTABLES:
            (venv / "bin" / name).touch()
        (venv / module.MARKER).write_text(module.marker_text())

    monkeypatch.setattr(module, "build", fake_build)
    module.builds = builds
    return module


def test_the_venv_lives_beside_cloudkittys(tool, tmp_path):
    assert tool.venv_path() == tmp_path / "cache" / "venv-gnocchi-4.7.1-keystone"
    assert tool.REQUIREMENTS == ("gnocchi[postgresql,file,keystone]==4.7.1",)


def test_built_once_then_reused_and_rebuilt_when_broken(tool, monkeypatch):
    lines = []
    venv = tool.ensure_venv(log=lines.append)
    assert tool.ensure_venv(log=lines.append) == venv
    assert tool.builds == [venv]
    assert lines[0].startswith("gnocchi venv built: ")
    assert lines[1].startswith("gnocchi venv reused: ")
    (venv / "bin" / "gnocchi-metricd").unlink()
    tool.ensure_venv(log=None)
    (venv / tool.MARKER).unlink()          # an interrupted build leaves no marker
    tool.ensure_venv(log=None)
    monkeypatch.setattr(tool, "REQUIREMENTS", (*tool.REQUIREMENTS, "extra-package"))
    tool.ensure_venv(log=None)
    assert len(tool.builds) == 4
    assert tool.main(["--rebuild"]) == 0 and len(tool.builds) == 5
