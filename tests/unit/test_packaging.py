"""Files shipped beside the code stay in step with it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "etc" / "cloudkitty-proc" / "cloudkitty-proc.conf.sample"
GEN_ARGS = ["--namespace", "cloudkitty_proc", "--namespace", "oslo.log"]


def test_config_sample_is_up_to_date(tmp_path):
    out = tmp_path / "sample.conf"
    proc = subprocess.run([sys.executable, "-m", "oslo_config.generator", *GEN_ARGS,
                           "--output-file", str(out)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == SAMPLE.read_text(), (
        "etc/cloudkitty-proc/cloudkitty-proc.conf.sample is stale: run `tox -e genconfig`")


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    unit = (REPO / "etc" / "systemd" / "cloudkitty-proc.service").read_text()
    for name in ("cloudkitty-proc-manage", "cloudkitty-proc"):
        exe = shutil.which(name)
        assert exe, f"{name} is not installed (pip install -e .)"
        unit = unit.replace(f"/usr/bin/{name} ", f"{exe} ")
    path = tmp_path / "cloudkitty-proc.service"
    path.write_text(unit)
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for needle in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "StateDirectory=cloudkitty-proc", "WatchdogSec="):
        assert needle in unit


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx not installed (pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html",
                           str(REPO / "doc" / "source"), str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "html" / "index.html").exists()
