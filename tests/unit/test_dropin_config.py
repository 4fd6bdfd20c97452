"""``[cloudkitty_proc] mode``: which storage ``plugins.load_storage`` builds."""

from __future__ import annotations

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckconf
from cloudkitty_proc import plugins
from cloudkitty_proc.dropin.storage import CloudKittyMode
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.storage.influx import InfluxStorage
from cloudkitty_proc.storage.sql import SQLStorage


def make_conf(tmp_path, **groups) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf([], project="cloudkitty-proc", default_config_files=[])
    conf.set_override("connection", f"sqlite:///{tmp_path}/ck.sqlite", "database")
    for group, options in groups.items():
        for name, value in options.items():
            conf.set_override(name, value, group)
    return conf


def test_native_is_the_default(tmp_path):
    conf = make_conf(tmp_path)
    assert conf.cloudkitty_proc.mode == "native"
    storage = plugins.load_storage(conf)
    assert type(storage) is SQLStorage


def test_cloudkitty_mode_builds_the_dropin_storage_over_the_backend(tmp_path):
    conf = make_conf(tmp_path, cloudkitty_proc={"mode": "cloudkitty"},
                     storage={"backend": "influxdb"}, storage_influxdb={"database": "ck"},
                     fetcher={"backend": "prometheus"},
                     collect={"collector": "prometheus", "period": 600})
    storage = plugins.load_storage(conf)
    assert isinstance(storage, CloudKittyMode) and isinstance(storage, InfluxStorage)
    assert (storage.ck_identity.scope_key, storage.ck_identity.fetcher,
            storage.ck_identity.collector) == ("project_id", "prometheus", "prometheus")
    assert storage.ck_period == 600
    assert type(plugins.load_storage(conf)) is type(storage)  # one class per backend


@pytest.mark.parametrize("backend", ["sql", "nosuch"])
def test_cloudkitty_mode_refuses_a_backend_cloudkittys_api_cannot_read(tmp_path, backend):
    conf = make_conf(tmp_path, cloudkitty_proc={"mode": "cloudkitty"},
                     storage={"backend": backend})
    with pytest.raises(ConfigError) as info:
        plugins.load_storage(conf)
    assert str(info.value) == (
        f"[storage] backend = {backend}: [cloudkitty_proc] mode = cloudkitty needs a "
        "backend CloudKitty's API reads (influxdb, elasticsearch, opensearch)")


def test_cloudkitty_mode_refuses_names_longer_than_cloudkittys_columns(tmp_path):
    conf = make_conf(tmp_path, cloudkitty_proc={"mode": "cloudkitty"},
                     storage={"backend": "influxdb"}, storage_influxdb={"database": "ck"},
                     fetcher={"backend": "f" * 41})
    with pytest.raises(ConfigError, match=r"\[fetcher\] backend 'f{41}': CloudKitty's "
                                          "cloudkitty_storage_states holds names of 1 to 40"):
        plugins.load_storage(conf)


def test_an_unknown_mode_is_refused(tmp_path):
    path = tmp_path / "ck.conf"
    path.write_text("[cloudkitty_proc]\nmode = cloudkity\n")
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf(["--config-file", str(path)], project="cloudkitty-proc", default_config_files=[])
    with pytest.raises(cfg.ConfigFileValueError, match="cloudkity"):
        conf.cloudkitty_proc.mode
