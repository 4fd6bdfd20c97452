"""cloudkitty-proc-manage and rating: check, quote, rules import-cloudkitty,
skip expressions and pyscripts, through the real command."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal as D

import pytest
import yaml

from tests import daemon, datagen
from tests.unit.test_cloudkitty_import import CloudKittyDB, build_sample

RULES = """\
hashmap:
  services:
    instance:
      mappings:
        - {cost: "0.002", group: support}
        - {cost: "1.05", type: rate, group: compute, start: "2026-02-01T00:00:00Z"}
      fields:
        flavor_name:
          mappings:
            - {value: m1.tiny, cost: "0.010", group: compute}
            - {value: m1.large, cost: "0.100", group: compute}
            - {value: m1.large, cost: "0.080", group: compute, scope: p-alpha}
    volume.size:
      mappings:
        - {cost: "0.0002", group: storage}
      thresholds:
        - {level: "500", cost: "0.9", type: rate, group: storage}
"""


def manage(conf, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "cloudkitty_proc.cli.manage", "--config-file", str(conf), *args],
        capture_output=True, text=True, timeout=120, cwd=daemon.REPO, env=daemon._env(),
        input=stdin)


def one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def conf(tmp_path, sqlite_url):
    (tmp_path / "x.om").write_text("# EOF\n")
    return daemon.write_config(tmp_path, db_url=sqlite_url, scopes=["p1"],
                               begin="2026-01-01T00:00:00Z", end="2026-01-01T02:00:00Z",
                               metrics_yml=datagen.METRICS_YML, om_path=tmp_path / "x.om",
                               processors="hashmap", rules_yml=RULES)


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------

def test_check_accepts_valid_rules(conf):
    proc = manage(conf, "check")
    assert proc.returncode == 0, proc.stderr
    assert "rating: hashmap" in proc.stdout


def test_check_refuses_bad_rules_naming_service_and_index(conf, tmp_path):
    rules = tmp_path / "rating.yml"
    rules.write_text(RULES.replace('{cost: "0.0002", group: storage}',
                                   '{cost: "0,0002", group: storage}'))
    line = one_line_error(manage(conf, "check"))
    assert str(rules) in line
    assert "service 'volume.size', mappings[0]" in line
    assert "'cost' is not a decimal" in line


def test_check_refuses_bad_threshold_naming_field(conf, tmp_path):
    (tmp_path / "rating.yml").write_text(RULES.replace(
        "            - {value: m1.large, cost: \"0.100\", group: compute}\n",
        "            - {value: m1.large, cost: \"0.100\", type: percent, group: compute}\n"))
    line = one_line_error(manage(conf, "check"))
    assert "service 'instance', field 'flavor_name', mappings[1]" in line
    assert "unknown type 'percent'" in line


@pytest.mark.parametrize("section", ["orchestrator", "collect"])
def test_check_refuses_unsafe_global_skip_expression(conf, section):
    """CloudKitty's [orchestrator] location, and the former [collect] one
    (a deprecated alias)."""
    conf.write_text(conf.read_text() + f"\n[{section}]\n"
                    "skip_datapoints_expression = __import__('os').getcwd()\n")
    line = one_line_error(manage(conf, "check"))
    assert str(conf) in line
    assert "[orchestrator] skip_datapoints_expression" in line
    assert "not allowed" in line


def test_check_shows_the_equivalent_of_a_cloudkitty_expression(conf):
    conf.write_text(conf.read_text() + '\n[orchestrator]\nskip_datapoints_expression = '
                    'datapoint.get("vol", {}).get("qty", 0) == 0\n')
    line = one_line_error(manage(conf, "check"))
    assert "[orchestrator] skip_datapoints_expression" in line
    assert "CloudKitty's Python expressions over 'datapoint' are not evaluated" in line
    assert line.endswith("the same here: qty == 0")


def test_check_refuses_unsafe_metric_skip_expression(conf, tmp_path):
    (tmp_path / "metrics.yml").write_text(datagen.METRICS_YML.replace(
        "    mutate: NUMBOOL\n",
        "    mutate: NUMBOOL\n    skip_datapoints_expression: \"().__class__\"\n"))
    line = one_line_error(manage(conf, "check"))
    assert "metric 'instance_up'" in line
    assert "key 'skip_datapoints_expression'" in line
    assert "attribute access is not allowed" in line


def test_check_accepts_safe_skip_expressions(conf, tmp_path):
    conf.write_text(conf.read_text().replace(
        "[collect]\n", "[collect]\nskip_datapoints_expression = qty == 0\n"))
    (tmp_path / "metrics.yml").write_text(datagen.METRICS_YML.replace(
        "    mutate: NUMBOOL\n",
        "    mutate: NUMBOOL\n"
        "    skip_datapoints_expression: \"metadata['flavor_name'] == 'm1.tiny' and qty < 1\"\n"))
    proc = manage(conf, "check")
    assert proc.returncode == 0, proc.stderr


def test_pyscripts_refused_unless_allowed(conf, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("def process(frame):\n    return frame\n")
    conf.write_text(conf.read_text().replace("processors = hashmap",
                                             "processors = hashmap, pyscripts")
                    + f"[pyscripts]\nscripts = {script}\n")
    line = one_line_error(manage(conf, "check"))
    assert "allow_pyscripts = true" in line
    conf.write_text(conf.read_text().replace("[rating]\n", "[rating]\nallow_pyscripts = true\n"))
    proc = manage(conf, "check")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------
# quote
# --------------------------------------------------------------------------

USAGE = {"resources": [
    {"service": "instance", "desc": {"flavor_name": "m1.large"}, "volume": "1"},
    {"service": "instance", "desc": {"flavor_name": "m1.tiny"}, "volume": 2},
    {"service": "volume.size", "desc": {"volume_type": "ssd"}, "volume": "600"},
], "period_start": "2026-01-15T10:00:00Z"}


def test_quote_prints_the_total(conf, tmp_path):
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps(USAGE))
    proc = manage(conf, "quote", "--usage", str(usage))
    assert proc.returncode == 0, proc.stderr
    # 0.100+0.002 ; 2*(0.010+0.002) ; 0.0002*600*0.9
    assert D(proc.stdout.strip()) == D("0.102") + D("0.024") + D("0.108")
    assert proc.stdout.strip() == "0.23400"  # Decimal arithmetic, digits kept


def test_quote_verbose_breakdown_scope_and_period(conf, tmp_path):
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({**USAGE, "scope": "p-alpha",
                                 "period_start": "2026-02-01T00:00:00Z"}))
    proc = manage(conf, "quote", "--usage", str(usage), "--verbose")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "scope: p-alpha"
    assert lines[1] == "period start: 2026-02-01T00:00:00+00:00"
    # 1.05*0.080 + 0.002 ; 2*(1.05*0.010 + 0.002) ; 0.108
    assert lines[2].startswith("[0] instance volume 1: 0.08600")
    assert lines[3].startswith("[1] instance volume 2: 0.02500")
    assert lines[4].startswith("[2] volume.size volume 600: 0.1080")
    assert D(lines[5].split()[-1]) == D("0.086") + D("0.025") + D("0.108")


def test_quote_accepts_a_bare_list_on_stdin(conf):
    usage = [{"service": "volume.size", "desc": {"volume_type": "ssd"}, "volume": 100}]
    proc = manage(conf, "quote", "--usage", "-", stdin=json.dumps(usage))
    assert proc.returncode == 0, proc.stderr
    assert D(proc.stdout) == D("0.02")  # current period, no scope


@pytest.mark.parametrize("body,where", [
    ({"resources": [{"service": "instance", "volume": "1"},
                    {"service": "instance", "volume": "lots"}]},
     "resources[1]: 'volume' is not a decimal"),
    ([{"service": "", "volume": 1}], "[0]: 'service'"),
    ({"resources": [{"service": "instance", "volume": 1, "vol": 2}]},
     "resources[0]: unknown key 'vol'"),
    ({"resources": [{"service": "instance", "desc": {"a": [1]}, "volume": 1}]},
     "resources[0]: desc['a']"),
    ({"resource": []}, "unknown top-level key 'resource'"),
    ({"resources": [], "period_start": "soon"}, "'period_start'"),
])
def test_quote_bad_usage_names_file_and_index(conf, tmp_path, body, where):
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps(body))
    line = one_line_error(manage(conf, "quote", "--usage", str(usage)))
    assert str(usage) in line
    assert where in line


def test_quote_invalid_json(conf, tmp_path):
    usage = tmp_path / "usage.json"
    usage.write_text('{"resources": [}')
    line = one_line_error(manage(conf, "quote", "--usage", str(usage)))
    assert str(usage) in line and "invalid JSON: line 1" in line


# --------------------------------------------------------------------------
# rules import-cloudkitty
# --------------------------------------------------------------------------

def test_import_cloudkitty_then_check_and_quote(conf, tmp_path):
    url = f"sqlite:///{tmp_path}/cloudkitty.sqlite"
    build_sample(CloudKittyDB(url))
    out = tmp_path / "rating.yml"
    proc = manage(conf, "rules", "import-cloudkitty", "--connection", url, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "7 mappings and 3 thresholds for 2 services written to" in proc.stderr
    assert proc.stdout == ""
    assert manage(conf, "check").returncode == 0
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"scope": "p-alpha", "period_start": "2026-01-15T10:00:00Z",
                                 "resources": [{"service": "instance",
                                                "desc": {"flavor_name": "m1.large"},
                                                "volume": "1"}]}))
    proc = manage(conf, "quote", "--usage", str(usage))
    assert D(proc.stdout) == D("0.082"), proc.stderr


def test_import_cloudkitty_to_stdout(conf, tmp_path):
    url = f"sqlite:///{tmp_path}/cloudkitty.sqlite"
    build_sample(CloudKittyDB(url))
    proc = manage(conf, "rules", "import-cloudkitty", "--connection", url)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    assert sorted(doc["hashmap"]["services"]) == ["instance", "volume.size"]


def test_import_cloudkitty_bad_database(conf, tmp_path):
    url = f"sqlite:///{tmp_path}/nothing.sqlite"
    line = one_line_error(manage(conf, "rules", "import-cloudkitty", "--connection", url))
    assert "not a CloudKitty database" in line
