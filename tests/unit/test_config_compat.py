"""CloudKitty's option names in our configuration, and every option of the
files classified (cloudkitty_proc/dropin/config_compat.py) against the
committed list of CloudKitty 25.0.0's options (tools/cloudkitty_options.py).
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import logging
import re
from pathlib import Path

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import config_check
from cloudkitty_proc.dropin import config_compat
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.orchestrator import pool_size
from tests.cloudkitty_conf import build_conf, render_conf

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "cloudkitty_proc" / "dropin" / "cloudkitty_options.json"
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
GROUP = re.compile(r"^(DEFAULT|[a-z][a-z0-9_]*)$")


def load(*paths: Path, config_dir: Path | None = None) -> cfg.ConfigOpts:
    """Our options, read from ``paths`` as the commands read them."""
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    args = [a for p in paths for a in ("--config-file", str(p))]
    if config_dir:
        args += ["--config-dir", str(config_dir)]
    conf(args, project="cloudkitty-proc", default_config_files=[], default_config_dirs=[])
    config_compat.apply_cloudkitty_defaults(conf)
    return conf


def cloudkitty_conf(tmp_path: Path, extra: dict) -> Path:
    """The conf the reference stack gives CloudKitty, with ``extra``."""
    sections = build_conf(
        tmp_path, name="ck-host", db_url="mysql+pymysql://ck:pw@127.0.0.1/ck",
        transport_url="rabbit://ck:pw@127.0.0.1:5672/ck", influx_host="127.0.0.1",
        influx_port=8086, influx_database="ck", prometheus_url="http://127.0.0.1:9090",
        scopes=["p1", "p2"], fetcher_metric=None, period=3600, wait_periods=2,
        extra={"cloudkitty_proc": {"mode": "cloudkitty"}, **extra})
    path = tmp_path / "cloudkitty.conf"
    path.write_text(render_conf(sections))
    return path


# --- the data file -------------------------------------------------------------

def test_the_cloudkitty_option_list_is_consistent():
    data = json.loads(DATA.read_text())
    assert data["cloudkitty"] == "25.0.0"
    seen = set()
    for entry in data["options"]:
        assert set(entry) == {"group", "name", "deprecated", "origin"}, entry
        assert GROUP.match(entry["group"]) and NAME.match(entry["name"]), entry
        assert entry["origin"] in data["namespaces"], entry
        for pair in entry["deprecated"]:
            assert len(pair) == 2 and GROUP.match(pair[0]) and NAME.match(pair[1]), entry
        key = (entry["group"], entry["name"])
        assert key not in seen, f"{key} listed twice"
        seen.add(key)
    for needed in [("orchestrator", "max_workers_reprocessing"),
                   ("orchestrator", "coordination_url"),
                   ("keystone_authtoken", "auth_url"),  # a keystoneauth plugin option
                   ("keystone_authtoken", "www_authenticate_uri"),
                   ("storage", "version"), ("storage", "retention_period"),
                   ("DEFAULT", "transport_url"), ("DEFAULT", "auth_strategy"),
                   ("collector_prometheus", "prometheus_url"), ("fetcher_source", "sources"),
                   ("database", "max_pool_size"), ("oslo_messaging_rabbit", "ssl")]:
        assert needed in seen, needed
    by_key = {(e["group"], e["name"]): e for e in data["options"]}
    assert by_key[("orchestrator", "max_threads")]["deprecated"] == [
        ["orchestrator", "max_greenthreads"]]
    known = config_compat.cloudkitty_options()
    assert known[("orchestrator", "max_greenthreads")] == ("orchestrator", "max_threads")
    assert len(seen) > 500


def test_the_option_list_ships_in_the_package():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    patterns = parser["options.package_data"]["cloudkitty_proc"].split()
    rel = str(DATA.relative_to(REPO / "cloudkitty_proc"))
    assert any(fnmatch.fnmatch(rel, p) for p in patterns), patterns


# --- our option names ------------------------------------------------------------

@pytest.mark.parametrize("lines, expected", [
    ("max_threads = 7", 7),                               # CloudKitty's name
    ("max_greenthreads = 5", 5),                          # the former one, deprecated
    ("max_threads = 7\nmax_greenthreads = 5", 7),         # the current name wins
    ("", 16),
])
def test_max_threads_sets_the_pool_of_a_worker(tmp_path, lines, expected):
    path = tmp_path / "c.conf"
    path.write_text(f"[orchestrator]\nmax_workers = 2\n{lines}\n")
    conf = load(path)
    assert conf.orchestrator.max_threads == expected
    assert pool_size(conf) == expected


def test_storage_version_1_is_refused_with_one_line(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[storage]\nversion = 1\n")
    with pytest.raises(ConfigError) as info:
        config_check.validate(load(path))
    assert str(info.value) == (f"{path}: [storage] version = 1: v1 storage is not supported "
                               "(only CloudKitty's v2 storage, version = 2)")
    path.write_text("[storage]\nversion = 2\n")
    config_check.validate(load(path))


def test_cloudkittys_defaults_apply_in_the_dropin_mode_only(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[cloudkitty_proc]\nmode = cloudkitty\n[collect]\ncollector = prometheus\n")
    conf = load(path)
    assert conf.orchestrator.coordination_url == "file:///var/lib/cloudkitty/locks"
    assert conf.collect.metrics_conf == "/etc/cloudkitty/metrics.yml"
    assert conf.fetcher.backend == "keystone"  # CloudKitty's: refused by name at start
    assert conf.storage.backend == "influxdb"
    assert conf.collect.collector == "prometheus"  # what the file says is kept
    path.write_text("[collect]\nperiod = 600\n")
    native = load(path)
    assert native.orchestrator.coordination_url.endswith("/cloudkitty-proc/locks")
    assert native.collect.metrics_conf == "/etc/cloudkitty-proc/metrics.yml"


# --- the classification ------------------------------------------------------------

EXTRA = {
    "orchestrator": {"max_threads": 7},
    "api": {"port": 8889},
    "keystone_authtoken": {"auth_url": "http://keystone:5000", "username": "cloudkitty"},
    "collect": {"perod": 600},                      # a typo
    "no_such_section": {"foo": 1},
    "Storage_InfluxDB": {"bucket": "ck"},           # section names are case-insensitive
}


def test_a_cloudkitty_conf_is_classified(tmp_path):
    path = cloudkitty_conf(tmp_path, EXTRA)
    result = config_compat.classify(load(path))
    assert result.no_effect == [
        ("DEFAULT", "auth_strategy"), ("DEFAULT", "api_paste_config"),
        ("orchestrator", "max_workers_reprocessing"), ("oslo_policy", "policy_file"),
        ("api", "port"), ("keystone_authtoken", "auth_url"),
        ("keystone_authtoken", "username"), ("storage_influxdb", "bucket")]
    assert result.no_effect_line() == (
        "CloudKitty 25.0.0 options accepted, no effect in cloudkitty-proc: "
        "[DEFAULT] api_paste_config (cloudkitty-api's), auth_strategy (cloudkitty-api's); "
        "[api] (cloudkitty-api's) port; "
        "[keystone_authtoken] (cloudkitty-api's) auth_url, username; "
        "[orchestrator] max_workers_reprocessing (reprocessing runs in the same workers); "
        "[oslo_policy] (cloudkitty-api's) policy_file; "
        "[storage_influxdb] bucket (InfluxDB 2 only)")
    assert result.unknown_lines() == [
        f"{path}: [collect] perod: unknown option, ignored (did you mean period?)",
        f"{path}: [no_such_section] foo: unknown option, ignored"]


def test_deprecated_names_and_every_file_read_are_covered(tmp_path):
    main = tmp_path / "cloudkitty.conf"
    main.write_text("[orchestrator]\nmax_greenthreads = 4\n[collect]\nskip_datapoints_expression"
                    " = False\n[DEFAULT]\nlogfile = /tmp/x.log\n")
    second = tmp_path / "cloudkitty-proc.conf"
    second.write_text("[cloudkitty_proc]\nmode = cloudkitty\n[colect]\nperiod = 60\n")
    confd = tmp_path / "conf.d"
    confd.mkdir()
    (confd / "10-api.conf").write_text("[api]\nport = 1\n[orchestrator]\nmax_workrs = 2\n")
    (confd / "notes.txt").write_text("[x]\ny = 1\n")  # not a *.conf: never read
    conf = load(main, second, config_dir=confd)
    assert config_compat.config_files(conf) == [str(main), str(second),
                                                str(confd / "10-api.conf")]
    result = config_compat.classify(conf)
    assert result.no_effect == [("api", "port")]
    assert result.unknown_lines() == [
        f"{second}: [colect] period: unknown option, ignored (did you mean [collect] period?)",
        f"{confd / '10-api.conf'}: [orchestrator] max_workrs: unknown option, ignored "
        "(did you mean max_workers?)"]


def test_the_oslo_messaging_options_are_ours(tmp_path):
    path = tmp_path / "c.conf"
    path.write_text("[oslo_messaging_rabbit]\nssl = true\n[DEFAULT]\nrpc_response_timeout = 9\n"
                    "control_exchange = cloudkitty\n")
    result = config_compat.classify(load(path))
    assert result.no_effect == [] and result.unknown == []


def test_the_native_mode_warns_about_unknown_options_too(tmp_path, caplog):
    path = tmp_path / "c.conf"
    path.write_text("[collect]\nperiod = 600\nwait_period = 1\n")
    with caplog.at_level(logging.INFO, logger=config_compat.__name__):
        config_compat.log_at_start(load(path))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"{path}: [collect] wait_period: unknown option, ignored "
                    "(did you mean wait_periods?)")]
