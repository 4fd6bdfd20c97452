"""cloudkitty.conf and its companion files for the reference CloudKitty stack
(tests/cloudkitty_stack.py): noauth API, storage v2 on InfluxDB 1.x,
collector prometheus, fetcher source or prometheus, file:// coordination
(CLOUDKITTY-DROPIN.md §5.2). Plain data: no CloudKitty import."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

API_PASTE_INI = """\
[pipeline:cloudkitty+noauth]
pipeline = request_id ck_api

[app:ck_api]
paste.app_factory = cloudkitty.api.app:app_factory

[filter:request_id]
paste.filter_factory = oslo_middleware:RequestId.factory
"""

#: noauth requests carry no roles: make every caller admin
POLICY_YAML = '"context_is_admin": "@"\n'


def render_conf(sections: dict[str, dict[str, object]]) -> str:
    """The ini text of ``{section: {option: value}}`` (None values left out)."""
    out = []
    for section, options in sections.items():
        out.append(f"[{section}]")
        out += [f"{k} = {v}" for k, v in options.items() if v is not None]
        out.append("")
    return "\n".join(out)


def build_conf(work: Path, *, name: str, db_url: str, transport_url: str,
               influx_host: str, influx_port: int, influx_database: str,
               prometheus_url: str, scopes: Sequence[str] | None,
               fetcher_metric: str | None, period: int, wait_periods: int,
               extra: dict[str, dict[str, object]] | None) -> dict[str, dict[str, object]]:
    """cloudkitty.conf's sections; ``extra`` adds or overrides options.

    ``prometheus_url`` is the server's base URL; CloudKitty's option wants the
    API root (it requests ``<prometheus_url>/query``), so ``/api/v1`` is added.
    """
    api_v1 = prometheus_url.rstrip("/")
    if not api_v1.endswith("/api/v1"):
        api_v1 += "/api/v1"
    if scopes is None and not fetcher_metric:
        raise ValueError("give scopes (fetcher source) or fetcher_metric (fetcher prometheus)")
    conf: dict[str, dict[str, object]] = {
        "DEFAULT": {"auth_strategy": "noauth", "api_paste_config": work / "api_paste.ini",
                    "transport_url": transport_url, "host": name, "debug": "false"},
        "database": {"connection": db_url},
        "storage": {"version": 2, "backend": "influxdb"},
        "storage_influxdb": {"host": influx_host, "port": influx_port,
                             "database": influx_database},
        "collect": {"collector": "prometheus", "scope_key": "project_id",
                    "metrics_conf": work / "metrics.yml", "period": period,
                    "wait_periods": wait_periods},
        "collector_prometheus": {"prometheus_url": api_v1},
        "orchestrator": {"coordination_url": f"file://{work}/locks", "max_workers": 1,
                         "max_workers_reprocessing": 1},
        "oslo_policy": {"policy_file": work / "policy.yaml"},
    }
    if scopes is not None:
        conf["fetcher"] = {"backend": "source"}
        conf["fetcher_source"] = {"sources": ",".join(scopes)}
    else:
        conf["fetcher"] = {"backend": "prometheus"}
        conf["fetcher_prometheus"] = {"prometheus_url": api_v1,
                                      "metric": fetcher_metric,
                                      "scope_attribute": "project_id"}
    for section, options in (extra or {}).items():
        conf.setdefault(section, {}).update(options)
    return conf
