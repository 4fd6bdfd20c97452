"""The period of the stored data never changes silently (issue 15 item 1):
a restart or a reload with another ``[collect] period`` is refused, and
``cloudkitty-proc-manage db set-period`` changes it without overlaps or gaps."""

from __future__ import annotations

import datetime

import pytest

from cloudkitty_proc import config_check
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.functional.test_cli_errors import _one_line_error, run

HOUR = datetime.timedelta(hours=1)


@pytest.fixture
def rated(tmp_path):
    """3 scopes, hours 0-2 rated with 3600 s periods; the data runs to hour 6."""
    ds = datagen.generate(n_scopes=3, hours=6)
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    db_url = f"sqlite:///{tmp_path}/ckp.sqlite"
    conf = daemon.write_config(
        tmp_path, db_url=db_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
        end=(ds.begin + 3 * HOUR).isoformat(), metrics_yml=datagen.METRICS_YML, om_path=om,
        workers=1)
    daemon.manage(conf, "db", "upgrade")
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ds, conf, db_url


def _with(conf, *, period=None, end=None, begin=None):
    text = conf.read_text()
    if period is not None:
        text = text.replace("period = 3600", f"period = {period}")
    if end is not None:
        text = "\n".join(f"end = {end.isoformat()}" if line.startswith("end = ") else line
                         for line in text.splitlines()) + "\n"
    conf.write_text(text)


def _periods(db_url):
    storage = SQLStorage(url=db_url)
    try:
        return [(p.scope_id, p.begin, p.end) for p in storage.iter_periods()]
    finally:
        storage.close()


@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("check",))])
def test_restart_with_another_period_is_refused(rated, cmd, args):
    ds, conf, db_url = rated
    before = _periods(db_url)
    _with(conf, period=1800)
    line = _one_line_error(run(cmd, conf, *args))
    assert "[collect] period = 1800 but the stored data is rated in 3600 s periods" in line
    assert "db set-period" in line
    assert _periods(db_url) == before


def test_reload_with_another_period_is_refused(rated, tmp_path):
    """What a SIGHUP does first, in the master and in every worker."""
    _ds, conf, _db = rated
    from oslo_config import cfg

    from cloudkitty_proc import conf as ckp_conf

    current = cfg.ConfigOpts()
    ckp_conf.register_opts(current)
    current(["--config-file", str(conf)])
    _with(conf, period=1800)
    with pytest.raises(ConfigError, match=r"\[collect\] period: 1800 cannot replace 3600 on "
                                          r"a reload"):
        config_check.check_files(current)
    assert current.collect.period == 3600


def test_set_period_continues_without_overlap_or_gap(rated):
    ds, conf, db_url = rated
    _with(conf, period=1800, end=ds.begin + 5 * HOUR)
    out = daemon.manage(conf, "db", "set-period").stdout
    assert "period of the stored data: 3600 -> 1800 s" in out
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for scope in ds.scopes:
        spans = [(b, e) for s, b, e in _periods(db_url) if s == scope]
        # hours 0-2 as they were, then half hours from 3:00 to 5:00: contiguous
        assert [e - b for b, e in spans] == [HOUR] * 3 + [HOUR / 2] * 4
        assert all(spans[n][1] == spans[n + 1][0] for n in range(len(spans) - 1))
        assert spans[0][0] == ds.begin and spans[-1][1] == ds.begin + 5 * HOUR


def test_set_period_refuses_scopes_off_the_new_boundaries(rated):
    ds, conf, db_url = rated
    # the next periods start at 03:00, not on a 2 h boundary
    _with(conf, period=7200, end=ds.begin + 4 * HOUR)
    line = _one_line_error(daemon.manage(conf, "db", "set-period", check=False))
    assert "period 7200 s refused: 3 scope(s) would not start on a 7200 s boundary" in line
    assert f"{ds.scopes[0]} (next period {(ds.begin + 3 * HOUR).isoformat()})" in line
    storage = SQLStorage(url=db_url)
    try:
        assert storage.rating_period() == 3600
    finally:
        storage.close()
