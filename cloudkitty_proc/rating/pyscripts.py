"""``pyscripts`` rating processor: operator-provided Python scripts.

**Trusted code only.** A script is ordinary Python run inside the worker
processes with their full privileges (files, network, the database
credentials in the configuration). The processor therefore refuses to load
unless ``[rating] allow_pyscripts = true``, and the scripts must be files
only the operator can write. This module is the one place in cloudkitty_proc
where Python source is compiled and run: everything else (skip expressions
included) uses data-only formats or the restricted language of
:mod:`cloudkitty_proc.expressions`.

Configuration::

    [rating]
    processors = hashmap, pyscripts
    allow_pyscripts = true

    [pyscripts]
    scripts = /etc/cloudkitty-proc/pyscripts/discount.py   # in this order
    # or: scripts_dir = /etc/cloudkitty-proc/pyscripts     # *.py, by name

A script is a Python file defining ``process(frame)``: it receives the
:class:`~cloudkitty_proc.dataframe.DataFrame` of one scope and one period
(after the processors listed before ``pyscripts``) and returns a frame (the
same one, changed with ``frame.replace_points``, or a new one)::

    import decimal

    def process(frame):
        for usage_type, points in frame.items():
            frame.replace_points(usage_type, [
                p._replace(price=p.price * decimal.Decimal("0.9"))
                for p in points])
        return frame

Each file is read and compiled with ``compile()`` and run once, with
``exec``, into the namespace of a fresh module object (its top-level code
runs at load, not per frame); the processor then calls its ``process``
for every frame, scripts in order. :meth:`PyScriptsProcessor.reload`
re-reads every script and keeps the scripts in force if any of them fails
to load. An exception raised by a script fails the rating of that period
(retried later), like any rating error.

``[pyscripts] contract = cloudkitty`` runs scripts written for CloudKitty
instead (no ``process`` function called; the script reads and sets a
global ``data`` dict): see :class:`CloudKittyScript`.
"""

from __future__ import annotations

import decimal
import glob
import logging
import os
import stat
import types
from collections.abc import Callable
from typing import Any, NamedTuple

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import ConfigError, RatingError
from cloudkitty_proc.rating.base import BaseRatingProcessor

pyscripts_opts = [
    cfg.StrOpt(
        "scripts_dir",
        help="Directory whose .py files are the pyscripts, run in file "
        "name order. Ignored when scripts is set.",
    ),
    cfg.ListOpt(
        "scripts",
        default=[],
        help="Script files run by the pyscripts processor, in this order "
        "(takes precedence over scripts_dir).",
    ),
    cfg.StrOpt(
        "contract",
        default="process",
        choices=[("process", "each script defines process(frame), called "
                  "for every frame"),
                 ("cloudkitty", "CloudKitty's scripts: the whole script runs "
                  "for every frame with a global dict 'data' (CloudKitty's "
                  "DataFrame.as_dict) that it reads and sets")],
        help="How the scripts are written.",
    ),
]

OPTS = [("pyscripts", pyscripts_opts)]


LOG = logging.getLogger(__name__)

_NOT_ALLOWED = (
    "[rating] processors: pyscripts is disabled: it runs the Python files of "
    "[pyscripts] scripts/scripts_dir inside the workers as trusted code with "
    "the daemon's privileges; set [rating] allow_pyscripts = true to enable "
    "it, and only for scripts the operator controls")


class Script(NamedTuple):
    path: str
    process: Callable[[DataFrame], DataFrame]


def script_paths(conf: cfg.ConfigOpts) -> list[str]:
    """The configured script files, in run order; ConfigError if none."""
    group = conf.pyscripts
    if group.scripts:
        return [os.path.abspath(p.strip()) for p in group.scripts if p.strip()]
    if group.scripts_dir:
        directory = group.scripts_dir
        if not os.path.isdir(directory):
            raise ConfigError(f"[pyscripts] scripts_dir = {directory}: not a "
                              "directory")
        paths = sorted(glob.glob(os.path.join(glob.escape(directory), "*.py")))
        if not paths:
            raise ConfigError(f"[pyscripts] scripts_dir = {directory}: no *.py "
                              "file in it")
        return [os.path.abspath(p) for p in paths]
    raise ConfigError("[pyscripts]: set scripts (a list of files) or "
                      "scripts_dir (a directory of *.py files)")


def refuse_writable_by_others(path: str) -> None:
    """ConfigError when the script ``path`` or its directory is writable by
    other users: anyone who can change (or, in the directory, add or
    replace) a script runs code with the daemon's privileges."""
    for what, target in (("pyscript", path), ("pyscript directory", os.path.dirname(path))):
        try:
            mode = os.stat(target).st_mode
        except OSError:
            continue  # a missing file is reported when it is read
        if mode & stat.S_IWOTH:
            raise ConfigError(f"{what} {target}: writable by other users (mode "
                              f"{stat.S_IMODE(mode):04o}); a pyscript runs with the "
                              f"daemon's privileges: chmod o-w {target}")


def load_script(path: str, contract: str = "process") -> Script:
    """Compile and run one script file; ConfigError naming it on failure.

    With the ``cloudkitty`` contract the script is only compiled here: it
    runs whole for every frame (:class:`CloudKittyScript`)."""
    refuse_writable_by_others(path)
    try:
        with open(path, "rb") as fh:
            source = fh.read()
    except OSError as exc:
        raise ConfigError(f"pyscript {path}: cannot read: "
                          f"{exc.strerror or exc}") from None
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError) as exc:
        line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        msg = getattr(exc, "msg", None) or str(exc)
        raise ConfigError(f"pyscript {path}:{line}: syntax error: "
                          f"{msg}") from None
    if contract == "cloudkitty":
        return Script(path, CloudKittyScript(path, code))
    stem = os.path.splitext(os.path.basename(path))[0]
    module = types.ModuleType(f"cloudkitty_proc_pyscript_{stem}")
    module.__file__ = path
    try:
        exec(code, module.__dict__)  # noqa: S102 - trusted operator code, see the module docstring
    except Exception as exc:
        raise ConfigError(f"pyscript {path}: failed while loading: "
                          f"{type(exc).__name__}: {exc}") from None
    process = module.__dict__.get("process")
    if not callable(process):
        raise ConfigError(f"pyscript {path}: defines no process(frame) "
                          "function")
    return Script(path, process)


class CloudKittyScript:
    """A script written for CloudKitty's pyscripts: run whole for every
    frame, as CloudKitty does, in a fresh global namespace holding ``data``:
    ``{"period": {"begin", "end"}, "usage": {type: [{"vol": {"unit",
    "qty"}, "rating": {"price"}, "groupby": {...}, "metadata": {...}}]}}``.
    The ``data`` it leaves is read back the way CloudKitty's
    ``DataFrame.from_dict`` does (a price defaults to 0; numbers go through
    ``str``); a malformed one fails the rating of the period, naming the
    script and the point."""

    def __init__(self, path: str, code: types.CodeType) -> None:
        self.path = path
        self.code = code

    def __call__(self, frame: DataFrame) -> DataFrame:
        data = {"period": {"begin": frame.begin, "end": frame.end},
                "usage": {usage_type: [
                    {"vol": {"unit": p.unit, "qty": p.qty}, "rating": {"price": p.price},
                     "groupby": dict(p.groupby), "metadata": dict(p.metadata)}
                    for p in points] for usage_type, points in frame.items()}}
        namespace = {"data": data}
        exec(self.code, namespace)  # noqa: S102 - trusted operator code, see the module docstring
        return self._frame(namespace.get("data"), frame)

    def _frame(self, data: Any, frame: DataFrame) -> DataFrame:
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            raise ValueError("the script left no dict 'data' with a 'usage' mapping")
        out = DataFrame(frame.scope_id, frame.begin, frame.end)
        for usage_type, points in usage.items():
            if not isinstance(usage_type, str) or not isinstance(points, list):
                raise ValueError(f"usage[{usage_type!r}] is not a list of points")
            out.add_points(usage_type, [self._point(raw, f"usage[{usage_type!r}][{n}]")
                                        for n, raw in enumerate(points)])
        return out

    @staticmethod
    def _point(raw: Any, where: str) -> DataPoint:
        try:
            vol = raw["vol"]
            price = (raw.get("rating") or {}).get("price", 0)
            point = DataPoint(str(vol["unit"]), _decimal(vol["qty"]), _decimal(price),
                              dict(raw["groupby"]), dict(raw["metadata"]))
        except (KeyError, TypeError, AttributeError, ValueError,
                decimal.InvalidOperation) as exc:
            raise ValueError(f"{where}: not a CloudKitty datapoint "
                             f"({type(exc).__name__}: {exc})") from None
        return point


def _decimal(value: Any) -> decimal.Decimal:
    number = decimal.Decimal(str(value))
    if not number.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return number


class PyScriptsProcessor(BaseRatingProcessor):
    """Runs the configured scripts on every frame, in order."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        if not conf.rating.allow_pyscripts:
            raise ConfigError(_NOT_ALLOWED)
        self.scripts: tuple[Script, ...] = self._load()
        LOG.warning("pyscripts: loaded %d trusted script(s): %s",
                    len(self.scripts), ", ".join(s.path for s in self.scripts))

    def _load(self) -> tuple[Script, ...]:
        contract = self.conf.pyscripts.contract
        return tuple(load_script(path, contract) for path in script_paths(self.conf))

    def process(self, frame: DataFrame) -> DataFrame:
        for script in self.scripts:  # one tuple per frame: see reload()
            try:
                result = script.process(frame)
            except Exception as exc:
                raise RatingError(f"pyscript {script.path}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(result, DataFrame):
                raise RatingError(f"pyscript {script.path}: process() returned "
                                  f"{type(result).__name__}, not the frame")
            frame = result
        return frame

    def reload(self) -> None:
        """Re-read every script; on any error keep the ones in force."""
        if not self.conf.rating.allow_pyscripts:
            LOG.error("pyscripts: not reloaded, keeping the %d scripts in "
                      "force: allow_pyscripts is now false (restart to "
                      "disable the processor)", len(self.scripts))
            raise ConfigError(_NOT_ALLOWED)
        try:
            scripts = self._load()
        except ConfigError as exc:
            LOG.error("pyscripts: not reloaded, keeping the %d scripts in "
                      "force: %s", len(self.scripts), exc)
            raise
        self.scripts = scripts
        LOG.info("pyscripts: reloaded %d script(s)", len(scripts))

    def check(self) -> None:
        """Compile and load every script (runs their top-level code)."""
        if not self.conf.rating.allow_pyscripts:
            raise ConfigError(_NOT_ALLOWED)
        self._load()
