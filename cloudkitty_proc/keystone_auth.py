"""keystoneauth1 sessions built from an oslo.config option group.

For the plugins that talk to OpenStack services (the keystone fetcher, and
whatever needs a Keystone token), built as OpenStack services and CloudKitty
build them::

    OPTS = [("fetcher_keystone", [*my_opts, *keystone_auth.group_opts()])]
    ...
    ks = keystone_auth.KeystoneSession(conf, "fetcher_keystone")
    ks.session.get("/projects", endpoint_filter={...})    # keystoneauth1 Session
    ks.describe(exc)                                     # one line, no secret

Options (``group_opts()``, what CloudKitty's ``list_opts`` shows for its
groups): keystoneauth's session options (``cafile``, ``certfile``,
``keyfile``, ``insecure``, ``timeout``, ``collect_timing``,
``split_loggers``, ``tls_ciphers``, ``tls_min_version``) and its common auth
options (``auth_type``, ``auth_section``). The auth plugin's own options
(``auth_url``, ``username``, ``password``, ``application_credential_id``,
``application_credential_secret``, ``project_name``, ...) are registered
when the session is built, in the group named by ``auth_section`` if set
(e.g. ``[fetcher_keystone] auth_section = ks_auth`` reads ``auth_type`` and
the credentials from ``[ks_auth]``), else in the group itself: exactly
``keystoneauth1.loading.register_auth_conf_options`` followed by
``load_auth_from_conf_options``, which CloudKitty runs when it imports a
plugin, after the configuration files are read. The session options are
always read from the group itself. Any keystoneauth1 auth type works
(``password``, ``v3password``, ``v3applicationcredential``, ``token``...).

Differences from CloudKitty: ``timeout`` unset means ``default_timeout``
(60 s) instead of no timeout at all (a Keystone that stops answering would
hang the worker's pass forever); errors are one line.

Secrets: the auth plugin's secret options (``password``,
``application_credential_secret``...) are oslo.config secrets (never shown
by ``log_opt_values``); keystoneauth1 never logs the bodies of its
authentication requests and logs tokens as hashes; :meth:`describe` masks
URL credentials and every secret value of the group before an error reaches
a log.

Green or not. The session does blocking I/O with ``requests``. The keystone
fetcher calls it from the worker's run thread between passes, when no query
is in flight in the collect pool: blocking there delays nothing, so it does
(as the Prometheus fetcher uses a plain transport). A caller on the
GreenPool (``green=True``) gets :meth:`call`, :meth:`auth_headers`,
:meth:`endpoint`, :meth:`user_id` run through ``eventlet.tpool.execute``: in
a real thread, while the hub goes on running the other green threads, with
keystoneauth1 and requests unchanged. Measured with five concurrent 1 s
requests from a GreenPool (benchmarks/bench_keystone_green.py): plain
requests 5.0 s (the hub is blocked), tpool 1.0 s. ``eventlet.import_patched("requests")`` was measured too and
rejected: it only goes green once requests and urllib3 are purged from
``sys.modules`` and imported again, and then keystoneauth1 no longer
recognises that copy's exceptions (a refused connection escapes as a raw
``requests.exceptions.ConnectionError`` instead of keystoneauth1's
``ConnectFailure``). tpool binds its reply channel to the hub of the first
thread that uses it: use ``green=True`` from the worker's run thread (the
GreenPool's) only; elsewhere (real threads, ``collect_executor =
threads``) use ``green=False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from keystoneauth1 import exceptions as ksa_exc
from keystoneauth1 import loading
from oslo_config import cfg

from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.log import mask_url

__all__ = ["DEFAULT_TIMEOUT", "KeystoneError", "KeystoneSession", "group_opts"]

#: seconds a request may take when the group's ``timeout`` is unset
DEFAULT_TIMEOUT = 60.0

KeystoneError = ksa_exc.ClientException

_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")
_POOL_NOISE = re.compile(r":? ?\w+ConnectionPool\(host=.*$")


def group_opts() -> list[cfg.Opt]:
    """keystoneauth1's session and common auth options, for a plugin's
    ``OPTS`` (new objects at each call); ``timeout`` says what unset means
    here."""
    opts = []
    for opt in loading.get_session_conf_options():
        if opt.dest == "timeout":
            opt = cfg.FloatOpt("timeout", help=(
                f"Seconds an HTTP request may take. Unset: {DEFAULT_TIMEOUT:g} (keystoneauth1 "
                "alone would wait forever)."))
        opts.append(opt)
    return [*opts, *loading.get_auth_common_conf_options()]


def _register_session_opts(conf: cfg.ConfigOpts, group: str) -> None:
    """keystoneauth1's session options in ``group``, those already there
    (from ``group_opts()``, with their own help) kept."""
    for opt in loading.get_session_conf_options():
        try:
            conf.register_opt(opt, group=group)
        except cfg.DuplicateOptError:
            pass


class KeystoneSession:
    """A keystoneauth1 ``Session`` (``.session``) and its auth plugin
    (``.auth``), loaded from the options of ``group``.

    Construction does no network I/O. A missing or unknown ``auth_type``, or
    a plugin option it requires, raises ConfigError naming the group.
    """

    def __init__(self, conf: cfg.ConfigOpts, group: str, *, green: bool = False,
                 default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.group = group
        self.green = green
        # registered now (not at import) so that auth_section, read from the
        # files, names the group auth_type is read from: CloudKitty's order
        _register_session_opts(conf, group)
        loading.register_auth_conf_options(conf, group)
        section = conf[group].auth_section or group
        self.where = f"[{group}]" if section == group else \
            f"[{group}] auth_section = {section}: [{section}]"
        try:
            name = conf[section].auth_type
        except cfg.NoSuchOptError:
            name = None
        if not name:
            raise ConfigError(f"{self.where} auth_type is not set: a Keystone auth type is "
                              "needed (password or v3applicationcredential, with auth_url "
                              "and the credentials)")
        try:
            self.auth = loading.load_auth_from_conf_options(conf, group)
        except ksa_exc.NoMatchingPlugin:
            raise ConfigError(f"{self.where} auth_type = {name}: no such keystoneauth1 "
                              "auth type (e.g. password, v3applicationcredential)") from None
        except ksa_exc.MissingRequiredOptions as exc:
            missing = ", ".join(o.dest for o in exc.options)
            raise ConfigError(f"{self.where} auth_type = {name}: missing {missing}") from None
        except ksa_exc.ClientException as exc:
            raise ConfigError(f"{self.where} auth_type = {name}: {exc}") from None
        self.auth_type = name
        self._secrets = sorted(
            {str(v) for o in loading.get_plugin_loader(name).get_options() if o.secret
             for v in [conf[section][o.dest]] if v}, key=len, reverse=True)
        timeout = conf[group].timeout or default_timeout
        try:
            self.session = loading.load_session_from_conf_options(
                conf, group, auth=self.auth, timeout=timeout)
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"[{group}] {self.describe(exc)}") from None

    # -- calls, green or not ---------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``: directly, or with ``green`` in a real
        thread (``eventlet.tpool``) while the caller's hub goes on."""
        if not self.green:
            return fn(*args, **kwargs)
        from eventlet import tpool  # green callers only: never in the master

        return tpool.execute(fn, *args, **kwargs)

    def auth_headers(self) -> dict[str, str]:
        """The headers that authenticate a request (``X-Auth-Token``),
        authenticating first when there is no valid token."""
        headers = self.call(self.session.get_auth_headers)
        if not headers:
            raise ksa_exc.AuthorizationFailure(f"{self.where} auth_type = {self.auth_type} "
                                               "gives no token")
        return headers

    def endpoint(self, **endpoint_filter: Any) -> str:
        """The URL of a service from the token's catalog (``service_type``,
        ``interface``, ``region_name``...), EndpointNotFound if none."""
        url = self.call(self.session.get_endpoint, **endpoint_filter)
        if not url:
            raise ksa_exc.EndpointNotFound(f"no {endpoint_filter} endpoint in the catalog")
        return url

    def user_id(self) -> str:
        """The id of the user the credentials authenticate."""
        return self.call(self.session.get_user_id)

    def invalidate(self) -> None:
        """Forget the token: the next request authenticates again (after a
        401 from a service the token was used with)."""
        self.auth.invalidate()

    def close(self) -> None:
        self.session.session.close()

    # -- errors --------------------------------------------------------------------
    def describe(self, exc: BaseException) -> str:
        """``exc`` as one line: keystoneauth1's connection messages
        shortened to their cause, URL credentials and the group's secrets
        masked."""
        if isinstance(exc, ksa_exc.HttpError):
            text = exc.message or exc.__class__.__name__
            if f"HTTP {exc.http_status}" not in text:
                text = f"HTTP {exc.http_status}: {text}"
            if exc.url:
                text = f"{exc.method or 'request'} {exc.url}: {text}"
        else:
            text = str(exc) or exc.__class__.__name__
            if isinstance(exc, ksa_exc.ConnectionError):
                cause = _ERRNO.search(text)
                text = _POOL_NOISE.sub("", text).rstrip(": ")
                if cause:
                    text = f"{text}: {cause.group(0).strip()}"
        text = " ".join(mask_url(text).split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
