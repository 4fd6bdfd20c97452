"""Where the requests of :mod:`cloudkitty_proc.http` go and whom they trust.

* proxies from the environment (``http_proxy``, ``https_proxy``,
  ``all_proxy``; ``no_proxy`` with names, suffixes, IP addresses and CIDR
  ranges, each with an optional port), read when an origin is first used;
* the TLS trust: the ``cafile`` option, else ``REQUESTS_CA_BUNDLE``, else
  the system's store (which honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``)
  plus certifi's bundle when installed;
* host names in ASCII (IDNA).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import urllib.parse
import urllib.request
from typing import Any

from cloudkitty_proc.log import safe_url


def basic_auth(user: str, password: str) -> str:
    # latin-1 first, as requests did (RFC 7617's historical default)
    try:
        raw = f"{user}:{password}".encode("latin-1")
    except UnicodeEncodeError:
        raw = f"{user}:{password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def idna_host(host: str) -> str:
    """``host`` in ASCII (IDNA 2008 with the ``idna`` package when
    installed, else the standard library's IDNA 2003), lower case."""
    if host.isascii():
        return host.lower()
    try:
        import idna
    except ImportError:
        idna = None
    try:
        if idna is not None:
            return idna.encode(host, uts46=True).decode("ascii")
        return host.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError) as exc:   # idna.IDNAError is a UnicodeError
        raise ValueError(f"host name {host!r}: {exc}") from None


def bypass_proxy(host: str, port: int, no_proxy: str) -> bool:
    """``no_proxy`` matches host:port: ``*``, names (``example.org`` also
    matches its subdomains, a leading ``.`` or ``*.`` is ignored), IP
    addresses and CIDR ranges, each with an optional ``:port``."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.startswith("["):
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else None
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        if entry_port and entry_port != str(port):
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.removeprefix("*").lstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


class _Proxy:
    """A proxy from the environment."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        self.url = safe_url(urllib.parse.urlunsplit(parts._replace(path="", query="")))
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError(f"proxy {self.url!r} from the environment: only http:// "
                             "proxies are supported")
        self.host = idna_host(parts.hostname)
        self.port = parts.port or 80
        self.headers: dict[str, str] = {}
        if parts.username is not None:
            self.headers["Proxy-Authorization"] = basic_auth(
                urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))


def environ_proxy(scheme: str, host: str, port: int) -> _Proxy | None:
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or bypass_proxy(host, port, proxies.get("no", "")):
        return None
    return _Proxy(url)


def tls_context(tree: Any, cafile: str | None, insecure: bool, option: str) -> Any:
    """cafile, else ``REQUESTS_CA_BUNDLE``, else the default paths (which
    honour ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``) plus certifi's bundle when
    installed and ``SSL_CERT_FILE`` is not set."""
    context = tree.create_context()
    if insecure and not cafile:
        context.check_hostname = False
        context.verify_mode = 0   # ssl.CERT_NONE
        return context
    where, path = f"{option.split(']')[0]}] cafile", cafile
    if not path and os.environ.get("REQUESTS_CA_BUNDLE"):
        where, path = "REQUESTS_CA_BUNDLE", os.environ["REQUESTS_CA_BUNDLE"]
    if path:
        try:
            if os.path.isdir(path):
                context.load_verify_locations(capath=path)
            else:
                context.load_verify_locations(cafile=path)
        except OSError as exc:
            raise type(exc)(exc.errno, f"{where} {path!r}: {exc.strerror or exc}") from None
        return context
    context.load_default_certs()
    if not os.environ.get("SSL_CERT_FILE"):
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
    return context


