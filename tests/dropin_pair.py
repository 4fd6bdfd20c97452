"""Two CloudKitty 25.0.0 deployments rating the same input, for the drop-in
acceptance test (tests/functional/test_dropin_acceptance.py, issue 18).

* The input: ``usage_openmetrics(first, last)`` — two scopes, three metrics
  (instances with a flavour, volumes with a size crossing a threshold,
  floating IPs), one sample every 5 minutes (never on a period boundary),
  backfilled into a real Prometheus (tests/prometheus_server.py).
* The rules: ``create_rules(stack, start)`` — the same calls on each API:
  hashmap services, a field with flat mappings per flavour (one of them
  replaced for one tenant), a service mapping and a service rate
  threshold, a service flat mapping; hashmap enabled. Mappings get a past
  ``start`` (``?force=true``): without it the API sets "now" and no past
  period would be priced.
* ``RatedBy``: how far a deployment rated, read from its MariaDB
  (``cloudkitty_storage_states``).
* ``DropinProcessor``: cloudkitty_proc run in place of cloudkitty-processor
  on a stack: ``cloudkitty-proc --config-file <the stack's cloudkitty.conf>
  --config-file <extra>``; the extra file only selects the drop-in mode and
  what the test needs (a state directory, a short poll interval, two
  workers).

Everything listens on 127.0.0.1; processes are stopped by the PID this
module started.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
from decimal import Decimal

from tests import daemon
from tests.cloudkitty_stack import CloudKittyStack

MANAGE = (sys.executable, "-m", "cloudkitty_proc.cli.manage")
DAEMON = (sys.executable, "-m", "cloudkitty_proc.cli.daemon")
PERIOD = 3600
H = datetime.timedelta(seconds=PERIOD)
SCOPES = ("p1", "p2")
HASHMAP = "/v1/rating/module_config/hashmap"

METRICS_YML = """\
metrics:
  instance_up:
    alt_name: instance
    unit: instance
    groupby: [id, project_id]
    metadata: [flavor_name]
    extra_args:
      aggregation_method: max
  volume_size:
    alt_name: volume.size
    unit: GiB
    groupby: [id, project_id]
    metadata: [volume_type]
    extra_args:
      aggregation_method: max
  ip_floating:
    alt_name: ip.floating
    unit: ip
    groupby: [id, project_id]
    metadata: [pool]
    extra_args:
      aggregation_method: max
"""

#: (metric, scope, id, metadata label, its value, value(h) or None when absent);
#: h = hours since the first period rated
SERIES = (
    ("instance_up", "p1", "vm-1", "flavor_name", "m1.small", lambda h: 1),
    ("instance_up", "p1", "vm-2", "flavor_name", "m1.tiny", lambda h: 1 if h < 5 else None),
    ("instance_up", "p2", "vm-3", "flavor_name", "m1.large", lambda h: 1),
    ("instance_up", "p2", "vm-4", "flavor_name", "m1.small", lambda h: 1 if h >= 3 else None),
    ("volume_size", "p1", "vol-1", "volume_type", "hdd", lambda h: 10 if h < 4 else 60),
    ("volume_size", "p2", "vol-2", "volume_type", "ssd", lambda h: 120),
    ("ip_floating", "p2", "fip-1", "pool", "public", lambda h: 1),
)

#: the unit prices of the rules (CloudKitty hashmap semantics)
PRICES = {"m1.small": Decimal("0.25"), "m1.tiny": Decimal("0.1"), "m1.large": Decimal("0.5"),
          "m1.large@p2": Decimal("0.4"), "volume.size": Decimal("0.01"),
          "volume.size>=50": Decimal("0.8"), "ip.floating": Decimal("0.005")}


def usage_openmetrics(first: datetime.datetime, end: datetime.datetime) -> str:
    """Samples from one period before ``first`` up to ``end`` (exclusive),
    every 300 s at +150 s (a sample never sits on a period boundary)."""
    start = int((first - H).timestamp())
    stop = int(end.timestamp())
    lines = []
    for metric in ("instance_up", "volume_size", "ip_floating"):
        lines.append(f"# TYPE {metric} gauge")
        for name, scope, rid, label, label_value, value in SERIES:
            if name != metric:
                continue
            labels = f'project_id="{scope}",id="{rid}",{label}="{label_value}"'
            for ts in range(start + 150, stop, 300):
                v = value((ts - int(first.timestamp())) // PERIOD)
                if v is not None:
                    lines.append(f"{metric}{{{labels}}} {v} {ts}")
    return "\n".join(lines) + "\n# EOF\n"


def create_rules(stack: CloudKittyStack, start: datetime.datetime) -> dict[str, str]:
    """The rules through the API (``start``: the mappings' start, forced);
    returns the ids the later steps need."""
    force = {"force": "true"}
    since = start.replace(tzinfo=None).isoformat()

    def mapping(**body):
        return stack.call("POST", f"{HASHMAP}/mappings", params=force,
                          json={"start": since, **body})

    instance = stack.call("POST", f"{HASHMAP}/services", json={"name": "instance"})
    flavor = stack.call("POST", f"{HASHMAP}/fields",
                        json={"service_id": instance["service_id"], "name": "flavor_name"})
    for value in ("m1.small", "m1.tiny", "m1.large"):
        mapping(field_id=flavor["field_id"], value=value, cost=str(PRICES[value]), type="flat")
    mapping(field_id=flavor["field_id"], value="m1.large", cost=str(PRICES["m1.large@p2"]),
            type="flat", tenant_id="p2")
    volume = stack.call("POST", f"{HASHMAP}/services", json={"name": "volume.size"})
    # flat: per unit of qty (a rate mapping alone prices 0 in CloudKitty's
    # hashmap: it multiplies the flat cost)
    mapping(service_id=volume["service_id"], cost=str(PRICES["volume.size"]), type="flat")
    stack.call("POST", f"{HASHMAP}/thresholds", json={
        "service_id": volume["service_id"], "level": "50",
        "cost": str(PRICES["volume.size>=50"]), "type": "rate"})
    fip = stack.call("POST", f"{HASHMAP}/services", json={"name": "ip.floating"})
    mapping(service_id=fip["service_id"], cost=str(PRICES["ip.floating"]), type="flat")
    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": True})
    return {"instance": instance["service_id"], "volume": volume["service_id"],
            "fip": fip["service_id"]}


def create_scope_rows(stack: CloudKittyStack, last: datetime.datetime) -> None:
    """Each scope's state row through ``POST /v2/scope`` at ``last``, so
    that rating starts at ``last + period`` (without a row CloudKitty
    starts at the start of the month)."""
    for scope in SCOPES:
        stack.call("POST", "/v2/scope", json={
            "scope_id": scope, "scope_key": "project_id", "fetcher": "source",
            "collector": "prometheus", "active": True,
            "last_processed_timestamp": last.isoformat()})


def rated_up_to(stack: CloudKittyStack) -> dict[str, datetime.datetime | None]:
    """scope -> last_processed_timestamp (UTC) in the stack's database."""
    rows = stack.sql("SELECT identifier, last_processed_timestamp FROM "
                     "cloudkitty_storage_states")
    return {r["identifier"]: r["last_processed_timestamp"].replace(tzinfo=datetime.UTC)
            if r["last_processed_timestamp"] else None for r in rows}


class DropinProcessor:
    """cloudkitty_proc in the drop-in mode on ``stack``'s own cloudkitty.conf."""

    def __init__(self, stack: CloudKittyStack, *, workers: int = 2,
                 faults: str | None = None) -> None:
        self.stack = stack
        self.work = stack.workdir / "cloudkitty-proc"
        self.work.mkdir(exist_ok=True)
        self.extra = self.work / "cloudkitty-proc.conf"
        self.extra.write_text(textwrap.dedent(f"""\
            # cloudkitty_proc in place of cloudkitty-processor: everything else
            # comes from CloudKitty's own cloudkitty.conf
            [DEFAULT]
            state_path = {self.work / 'state'}
            [cloudkitty_proc]
            mode = cloudkitty
            [orchestrator]
            max_workers = {workers}
            poll_interval = 1
            """))
        self.log = self.work / "daemon.log"
        self.faults = faults
        self.proc: subprocess.Popen | None = None

    @property
    def args(self) -> tuple[str, ...]:
        return ("--config-file", str(self.stack.conf_path), "--config-file", str(self.extra))

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        """``cloudkitty-proc-manage <both files> args`` (checked)."""
        proc = subprocess.run(
            [*MANAGE, *self.args, *args], capture_output=True, text=True,
            timeout=120, env=daemon._env(), cwd=daemon.REPO)
        if proc.returncode != 0:
            raise AssertionError(f"cloudkitty-proc-manage {' '.join(args)} exited "
                                 f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> subprocess.Popen:
        env = {"CKP_FAULTS": self.faults} if self.faults else None
        self.proc = subprocess.Popen(
            [*DAEMON, *self.args], stdout=open(self.log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, env=daemon._env(env), cwd=daemon.REPO)
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            daemon.stop_daemon(self.proc)
            self.proc = None


def api_both(a: CloudKittyStack, b: CloudKittyStack, method: str, path: str, **kwargs):
    """The same request to both APIs: (A's reply, B's reply)."""
    return a.request(method, path, **kwargs), b.request(method, path, **kwargs)


def as_dt(text: str) -> datetime.datetime:
    """An API timestamp; a naive one (the reprocessing tasks') is UTC."""
    dt = datetime.datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=datetime.UTC)
