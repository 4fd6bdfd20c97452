#!/usr/bin/env python3
"""Every option CloudKitty 25.0.0's configuration knows, as a data file.

Writes ``cloudkitty_proc/dropin/cloudkitty_options.json``: one entry per
``(group, name)`` with its deprecated ``(group, name)`` pairs and where it
comes from. ``cloudkitty_proc/dropin/config_compat.py`` reads it to tell an
option CloudKitty has (accepted, no effect in cloudkitty-proc, logged once)
from an unknown one (a warning per option).

Regenerate (after a CloudKitty version change, or to check the file)::

    python tools/cloudkitty_options.py            # rewrite the JSON
    python tools/cloudkitty_options.py --check    # exit 1 if it is stale

Both build or reuse the CloudKitty virtualenv of ``tools/cloudkitty_venv.py``
(``${CLOUDKITTY_PROC_CACHE:-$HOME/.cache/cloudkitty-proc}/venv-cloudkitty-api-25.0.0``)
and run this file with that venv's python (``--collect``, printing JSON on
stdout): CloudKitty is never imported into our own process (its oslo.config
options clash with ours).

What is collected, inside the venv:

1. the options of the namespaces of CloudKitty's own oslo-config-generator
   configuration (``etc/oslo-config-generator/cloudkitty.conf`` of the
   25.0.0 sdist: ``cloudkitty.common.config``, cotyledon, oslo.concurrency,
   oslo.db, oslo.log, oslo.messaging, oslo.middleware, oslo.policy,
   keystonemiddleware.auth_token), loaded through their ``oslo.config.opts``
   entry points as oslo-config-generator loads them;
2. the options CloudKitty's modules register without listing them there
   (``[storage] retention_period``, ``[storage_hybrid] backend``,
   ``[api] pecan_debug``): every ``cloudkitty.*`` module is imported
   (tests, wsgi and hacking left out) and the global ``cfg.CONF`` walked;
3. the options of every keystoneauth1 auth plugin (``auth_url``,
   ``username``, ``project_name``, ...) in each group with an ``auth_type``
   option: CloudKitty and keystonemiddleware register them at run time from
   ``auth_type``, so a real ``cloudkitty.conf`` carries them.

Names are the ones a configuration file uses (``dest``: ``log-file`` is
``log_file``); a deprecated pair without a group is in the option's group.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "cloudkitty_proc" / "dropin" / "cloudkitty_options.json"
CLOUDKITTY_VERSION = "25.0.0"

#: etc/oslo-config-generator/cloudkitty.conf of CloudKitty 25.0.0
NAMESPACES = (
    "cloudkitty.common.config",
    "cotyledon",
    "oslo.concurrency",
    "oslo.db",
    "oslo.log",
    "oslo.messaging",
    "oslo.middleware.http_proxy_to_wsgi",
    "oslo.middleware.cors",
    "oslo.policy",
    "keystonemiddleware.auth_token",
)

#: cloudkitty modules not imported to find module-level registrations
SKIPPED_MODULES = (".tests", ".wsgi", ".hacking", "alembic")

KEYSTONEAUTH_ORIGIN = "keystoneauth1 auth plugins (auth_type)"
MODULES_ORIGIN = "cloudkitty modules (registered outside list_opts)"


# --- inside CloudKitty's venv (--collect) -----------------------------------

def _dest(name: str) -> str:
    return name.replace("-", "_")


def _collect() -> list[dict]:
    """The option entries, run with the CloudKitty venv's python."""
    import importlib
    import pkgutil
    import warnings
    from importlib.metadata import entry_points

    warnings.simplefilter("ignore")
    from oslo_config import cfg

    found: dict[tuple[str, str], dict] = {}

    def add(group: str | None, opt, origin: str) -> None:
        group = group or "DEFAULT"
        key = (group, opt.dest)
        if key in found:
            return
        deprecated = sorted({(d.group or group, _dest(d.name))
                             for d in opt.deprecated_opts if d.name})
        found[key] = {"group": group, "name": opt.dest,
                      "deprecated": [list(d) for d in deprecated], "origin": origin}

    eps = {ep.name: ep for ep in entry_points(group="oslo.config.opts")}
    for namespace in NAMESPACES:
        if namespace not in eps:
            raise SystemExit(f"no oslo.config.opts entry point {namespace!r} in the venv")
        for group, opts in eps[namespace].load()():
            name = getattr(group, "name", group)
            for opt in opts:
                add(name, opt, namespace)

    import cloudkitty
    for module in pkgutil.walk_packages(cloudkitty.__path__, "cloudkitty.",
                                        onerror=lambda name: None):
        if any(part in module.name for part in SKIPPED_MODULES):
            continue
        try:
            importlib.import_module(module.name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            print(f"skipped {module.name}: {exc!r}", file=sys.stderr)
    conf = cfg.CONF
    for info in conf._opts.values():
        if not info.get("cli"):
            add(None, info["opt"], MODULES_ORIGIN)
    for group in conf._groups.values():
        for info in group._opts.values():
            if not info.get("cli"):
                add(group.name, info["opt"], MODULES_ORIGIN)

    from keystoneauth1 import loading as ks_loading
    plugin_opts = {}
    for plugin in sorted(ks_loading.get_available_plugin_names()):
        for opt in ks_loading.get_plugin_options(plugin):
            plugin_opts.setdefault(opt.dest, opt)
    for group in sorted({g for g, n in found if n == "auth_type"}):
        for opt in plugin_opts.values():
            add(group, opt._to_oslo_opt(), KEYSTONEAUTH_ORIGIN)
    return sorted(found.values(), key=lambda e: (e["group"] != "DEFAULT", e["group"],
                                                 e["name"]))


# --- in our process -----------------------------------------------------------

def render(entries: list[dict]) -> str:
    """The data file's text: a header, then one option per line (diffable)."""
    head = {
        "cloudkitty": CLOUDKITTY_VERSION,
        "generated_by": "tools/cloudkitty_options.py (its docstring says how to "
                        "regenerate this file)",
        "namespaces": list(NAMESPACES) + [MODULES_ORIGIN, KEYSTONEAUTH_ORIGIN],
    }
    lines = [json.dumps({k: v}, separators=(", ", ": "))[1:-1] + "," for k, v in head.items()]
    body = [json.dumps(e, separators=(", ", ": ")) for e in entries]
    return "{\n" + "\n".join(lines) + '\n"options": [\n' + ",\n".join(body) + "\n]}\n"


def generate() -> str:
    """The data file's text, from CloudKitty's venv (built if missing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cloudkitty_venv

    venv = cloudkitty_venv.ensure_venv(log=lambda line: print(line, file=sys.stderr))
    python = cloudkitty_venv.bin_path("python", venv)
    proc = subprocess.run([str(python), "-W", "ignore", str(Path(__file__).resolve()),
                           "--collect"], capture_output=True, text=True, timeout=300,
                          cwd="/")
    if proc.returncode != 0:
        raise SystemExit(f"{python} {__file__} --collect failed (exit {proc.returncode}):\n"
                         + proc.stderr[-4000:])
    return render(json.loads(proc.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if {OUTPUT.relative_to(REPO)} is not up to date")
    parser.add_argument("--collect", action="store_true",
                        help="(inside CloudKitty's venv) print the entries as JSON")
    args = parser.parse_args(argv)
    if args.collect:
        json.dump(_collect(), sys.stdout)
        return 0
    text = generate()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(REPO)} is stale: run python tools/cloudkitty_options.py",
                  file=sys.stderr)
            return 1
        print(f"{OUTPUT.relative_to(REPO)} is up to date")
        return 0
    OUTPUT.write_text(text)
    count = text.count('"group": ')
    print(f"wrote {OUTPUT.relative_to(REPO)}: {count} options")
    return 0


if __name__ == "__main__":
    sys.exit(main())
