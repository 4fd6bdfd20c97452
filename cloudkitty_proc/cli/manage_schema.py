"""``cloudkitty-proc-manage db …`` and ``storage …``: the schema and the stores."""

from __future__ import annotations

from oslo_config import cfg

from cloudkitty_proc import data_period, plugins
from cloudkitty_proc.exceptions import ConfigError, SchemaError, StorageError

CONF = cfg.CONF


def open_storage():
    return plugins.load_storage(CONF)


def checked_storage():
    storage = open_storage()
    try:
        storage.check_schema()
    except SchemaError as exc:
        storage.close()
        raise ConfigError(str(exc)) from None
    return storage


def cmd_db() -> int:
    storage = open_storage()
    try:
        action = CONF.command.db_action
        if action == "upgrade":
            storage.upgrade()
            print(f"database schema at revision {storage.current_revision()}")
        elif action == "set-period":
            storage.check_schema()
            old = data_period.change(storage, CONF.collect.period)
            print(f"period of the stored data: {old or 'none'} -> {CONF.collect.period} s")
        else:
            print(storage.current_revision() or "none")
        return 0
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        storage.close()


def cmd_storage() -> int:
    """``storage init``: the point store's database or index (idempotent)."""
    storage = open_storage()
    try:
        points = getattr(storage, "points", None)
        if points is None:
            print(f"nothing to do: the {CONF.storage.backend} backend keeps the rated data "
                  "in [database] (`db upgrade` creates its tables)")
            return 0
        points.init()
        print(f"{points.name}: ready ({CONF.storage.backend} backend)")
        return 0
    except StorageError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        storage.close()
