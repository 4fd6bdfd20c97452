"""tools/cloudkitty_venv.py and tools/keystone_venv.py decide to reuse or
rebuild their venv from its marker (no pip run here: ``build`` is replaced)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


#: tool module, its venv's name, its log label, the requirement it pins
TOOLS = {
    "cloudkitty_venv": ("venv-cloudkitty-api-25.0.0", "cloudkitty", "cloudkitty==25.0.0"),
    "keystone_venv": ("venv-keystone-30.0.0", "keystone", "keystone==30.0.0"),
}


@pytest.fixture(params=sorted(TOOLS))
def tool(request, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(request.param,
                                                  ROOT / "tools" / f"{request.param}.py")
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
    module.expected = TOOLS[request.param]
    return module


def test_the_venv_lives_under_the_cache_directory(tool, tmp_path):
    name, _, pinned = tool.expected
    assert tool.venv_path() == tmp_path / "cache" / name
    assert pinned in tool.REQUIREMENTS


def test_built_once_then_reused(tool):
    lines = []
    venv = tool.ensure_venv(log=lines.append)
    assert tool.ensure_venv(log=lines.append) == venv
    assert tool.builds == [venv]
    label = tool.expected[1]
    assert lines[0].startswith(f"{label} venv built: ") and lines[0].endswith(" s)")
    assert lines[1].startswith(f"{label} venv reused: ")


def test_rebuilt_when_the_requirement_list_changes(tool, monkeypatch):
    venv = tool.ensure_venv(log=None)
    monkeypatch.setattr(tool, "REQUIREMENTS", (*tool.REQUIREMENTS, "extra-package"))
    assert not tool.is_current(venv)
    tool.ensure_venv(log=None)
    assert len(tool.builds) == 2 and tool.is_current(venv)


def test_rebuilt_when_an_executable_is_missing_or_the_marker_is(tool):
    venv = tool.ensure_venv(log=None)
    (venv / "bin" / tool.EXECUTABLES[-1]).unlink()
    tool.ensure_venv(log=None)
    (venv / tool.MARKER).unlink()          # an interrupted build leaves no marker
    tool.ensure_venv(log=None)
    assert len(tool.builds) == 3


def test_the_script_rebuilds_on_request(tool):
    tool.ensure_venv(log=None)
    assert tool.main(["--rebuild"]) == 0
    assert len(tool.builds) == 2
