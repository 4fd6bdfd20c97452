"""The package's shape: small modules, no import cycle, each module importable
on its own (the rules of doc/source/design.rst, "Layout")."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import import_graph  # noqa: E402

#: the most lines a module of cloudkitty_proc/ may have (migrations aside)
MAX_LINES = 450

MODULES = import_graph.modules(REPO)


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in MODULES.items()
            if ".migrations" not in name
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_no_import_cycle(lazy):
    assert import_graph.cycles(lazy=lazy, root=REPO) == []


def test_the_graph_sees_imports_of_every_form(tmp_path):
    """The cycle check would pass vacuously if it missed an import form."""
    pkg = tmp_path / "cloudkitty_proc"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cloudkitty_proc.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("def f():\n    import cloudkitty_proc.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from cloudkitty_proc import a\n")
    assert import_graph.cycles(lazy=False, root=tmp_path) == []
    assert import_graph.cycles(lazy=True, root=tmp_path) == [
        ["cloudkitty_proc.a", "cloudkitty_proc.c", "cloudkitty_proc.sub.b"]]


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """In any order means alone first: one interpreter per module."""
    names = [n for n in MODULES if ".migrations" not in n]
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            "for name in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {name}'],\n"
            "                       capture_output=True, text=True)\n"
            "    if r.returncode:\n"
            "        bad.append(name + ': ' + (r.stderr.strip().splitlines() or ['?'])[-1])\n"
            "print('\\n'.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
    assert importlib.util.find_spec("cloudkitty_proc") is not None
