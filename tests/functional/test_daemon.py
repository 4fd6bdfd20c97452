"""The real daemon, end to end: generated usage → --oneshot → export.

Every test compares the export with rows computed independently by
tests/datagen.py (which series exists in which hour, and its value).
"""

from __future__ import annotations

import datetime
import decimal
import os
from collections import Counter
import stat

import pytest

from tests import daemon, datagen


def _prepare(tmp_path, db_url, ds, **kw):
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    conf = daemon.write_config(
        tmp_path, db_url=db_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
        end=ds.end.isoformat(), metrics_yml=datagen.METRICS_YML, om_path=om, **kw)
    daemon.manage(conf, "db", "upgrade")
    return conf


def _assert_complete(conf, ds):
    records = daemon.export(conf)
    problems = datagen.check_export(ds, records)
    assert not problems, "\n".join(problems)
    states = {s["scope_id"]: s for s in daemon.status(conf)["scopes"]}
    last = (ds.end - datetime.timedelta(hours=1)).isoformat()
    assert {sid: s["last_processed"] for sid, s in states.items()} == \
        {sid: last for sid in ds.scopes}
    return records


def test_oneshot_two_workers_exactly_once(tmp_path, db_url):
    """10 scopes × 24 periods × 3 metrics, 2 workers, on each SQL backend."""
    ds = datagen.generate(n_scopes=10, hours=24, empty_scope_hours={(3, 5), (3, 6)})
    conf = _prepare(tmp_path, db_url, ds, workers=2)
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cloudkitty-proc --oneshot" in proc.stdout  # the summary
    records = _assert_complete(conf, ds)
    # scope 3 had two empty hours: committed as empty, not skipped
    assert not [r for r in records if r["scope_id"] == ds.scopes[3]
                and r["begin"] in ("2026-01-01T05:00:00+00:00", "2026-01-01T06:00:00+00:00")]
    # export is ordered by scope, begin, type
    keys = [(r["scope_id"], r["begin"], r["type"]) for r in records]
    assert keys == sorted(keys)


def test_second_oneshot_does_nothing(tmp_path, sqlite_url):
    ds = datagen.generate(n_scopes=3, hours=6)
    conf = _prepare(tmp_path, sqlite_url, ds, workers=2)
    assert daemon.run_oneshot(conf).returncode == 0
    first = daemon.export(conf)
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stderr
    assert daemon.export(conf) == first


@pytest.mark.parametrize("point", ["before_commit", "during_commit"])
def test_worker_killed_around_commit_rates_each_period_once(tmp_path, sqlite_url, point):
    """Invariant 1: every worker SIGKILLs itself at its 4th commit attempt
    (before it, or inside the transaction after the rows were inserted);
    respawned workers finish the job with every period exactly once."""
    ds = datagen.generate(n_scopes=4, hours=12, seed=11)
    conf = _prepare(tmp_path, sqlite_url, ds, workers=2)
    proc = daemon.run_oneshot(conf, env={"CKP_FAULTS": f"{point}:4"}, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the workers really died (cotyledon logs each death) and were respawned
    assert (proc.stdout + proc.stderr).count("killed by signal") >= 2
    _assert_complete(conf, ds)


def test_daemon_refuses_old_schema(tmp_path, sqlite_url):
    ds = datagen.generate(n_scopes=1, hours=2)
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    conf = daemon.write_config(tmp_path, db_url=sqlite_url, scopes=ds.scopes,
                               begin=ds.begin.isoformat(), end=ds.end.isoformat(),
                               metrics_yml=datagen.METRICS_YML, om_path=om)
    proc = daemon.run_oneshot(conf, timeout=60)
    assert proc.returncode == 1
    assert "cloudkitty-proc-manage db upgrade" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_filters_and_formats(tmp_path, sqlite_url):
    import csv
    import json

    ds = datagen.generate(n_scopes=3, hours=6, seed=21)
    conf = _prepare(tmp_path, sqlite_url, ds, workers=1)
    assert daemon.run_oneshot(conf).returncode == 0
    every = daemon.export(conf)
    scope = ds.scopes[1]
    window = daemon.export(conf, "--scope", scope, "--begin", "2026-01-01T02:00:00",
                           "--end", "2026-01-01T04:00:00Z")
    # half-open window on the period start, one scope, times without offset are UTC
    assert window == [r for r in every if r["scope_id"] == scope
                      and "2026-01-01T02:00:00+00:00" <= r["begin"] < "2026-01-01T04:00:00+00:00"]
    assert {r["begin"] for r in window} == {"2026-01-01T02:00:00+00:00",
                                            "2026-01-01T03:00:00+00:00"}
    out = tmp_path / "all.csv"
    proc = daemon.manage(conf, "export", "--format", "csv", "--output", str(out))
    assert f"{len(every)} rows written" in proc.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [{**r, "groupby": json.loads(r["groupby"]), "metadata": json.loads(r["metadata"])}
            for r in rows] == every


def test_state_path_with_a_trailing_slash_rates_everything(tmp_path):
    """``state_path = /dir/`` made the default lock URL ``file:///dir//locks``:
    tooz refused every lock and nothing was rated (issue 15 item 6)."""
    ds = datagen.generate(n_scopes=2, hours=3)
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=1)
    text = conf.read_text()
    state = f"state_path = {tmp_path / 'state'}"
    assert state in text
    conf.write_text(text.replace(state, state + "//"))
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_complete(conf, ds)
    assert (tmp_path / "state" / "locks").is_dir()


def test_lock_directory_is_private_whatever_the_umask(tmp_path):
    """With umask 022 the lock directory was 0755 (issue 15 item 14)."""
    ds = datagen.generate(n_scopes=1, hours=2)
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/db/ckp.sqlite", ds, workers=1)
    old = os.umask(0o022)
    try:
        proc = daemon.run_oneshot(conf)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "locks").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "db" / "ckp.sqlite").st_mode) == 0o600


@pytest.mark.parametrize("section", ["orchestrator", "collect"])
def test_skip_expression_applies_after_rating(tmp_path, section):
    """As CloudKitty: after the rating chain, just before storage, so the
    expression sees the price ([collect] is the deprecated alias). Applied at
    collection (price still 0), ``price == 0`` dropped everything."""
    ds = datagen.generate(n_scopes=2, hours=3)
    rules = ("hashmap:\n  services:\n    instance:\n      mappings:\n"
             "        - {cost: \"0.01\", type: flat}\n")
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=1,
                    processors="hashmap", rules_yml=rules,
                    extra=f"[{section}]\nskip_datapoints_expression = price == 0\n")
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = daemon.export(conf)
    assert records and {r["type"] for r in records} == {"instance"}
    assert datagen.export_keys(records) == Counter(k for k in ds.expected if k[2] == "instance")
    # every period was committed, the skipped types simply not stored
    last = (ds.end - datetime.timedelta(hours=1)).isoformat()
    assert {s["last_processed"] for s in daemon.status(conf)["scopes"]} == {last}


def test_every_datapoint_carries_cloudkittys_time_keys(tmp_path):
    """week_of_the_year (%U), day_of_the_year (%-j), month (%-m), year (%Y)
    of the period start, in groupby as CloudKitty's collectors add them: in
    storage and the export, and seen by rating rules (issue 16 item 3)."""
    ds = datagen.generate(n_scopes=1, hours=3)
    rules = ("hashmap:\n  services:\n    instance:\n      fields:\n        day_of_the_year:\n"
             "          mappings:\n            - {value: \"1\", cost: \"2\", type: flat}\n")
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=1,
                    processors="hashmap", rules_yml=rules)
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = daemon.export(conf)
    assert records
    for r in records:
        begin = datetime.datetime.fromisoformat(r["begin"])
        assert {k: r["groupby"][k] for k in ("week_of_the_year", "day_of_the_year", "month",
                                             "year")} == {
            "week_of_the_year": begin.strftime("%U"), "day_of_the_year": begin.strftime("%-j"),
            "month": begin.strftime("%-m"), "year": begin.strftime("%Y")}
    assert ds.begin.strftime("%-j") == "1"
    instance = [r for r in records if r["type"] == "instance"]
    assert instance and all(decimal.Decimal(r["price"]) == 2 for r in instance)


def _oneshot_on_a_terminal(conf) -> tuple[int, str]:
    """Run --oneshot with stdout and stderr on a pseudo-terminal, as an
    operator does; returns (exit code, what the terminal showed)."""
    import pty
    import subprocess
    import sys

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudkitty_proc.cli.daemon", "--config-file", str(conf),
         "--oneshot"], stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL,
        env=daemon._env(), cwd=daemon.REPO)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_oneshot_on_a_terminal_shows_progress_not_a_line_per_period(tmp_path):
    """Hundreds of INFO lines, one per period, came before the summary on a
    terminal (issue 16 item 10); logs to a pipe or a file keep them."""
    ds = datagen.generate(n_scopes=3, hours=4)
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=1)
    code, shown = _oneshot_on_a_terminal(conf)
    assert code == 0, shown
    assert "committed period" not in shown
    assert "cloudkitty-proc --oneshot" in shown  # the summary
    # the same run logging to a pipe: one line per committed period
    (tmp_path / "piped").mkdir()
    conf2 = _prepare(tmp_path / "piped", f"sqlite:///{tmp_path}/piped.sqlite", ds, workers=1)
    proc = daemon.run_oneshot(conf2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("committed period") == 3 * 4
