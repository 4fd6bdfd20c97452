"""CloudKitty's RPC messages (CLOUDKITTY-DROPIN.md §4): their arguments
checked, and converted to what cloudkitty_proc's control layer takes.

Every refusal is an InvalidRequestError whose message names the key at
fault (``res_data.scopes[0].scope_id: ...``): the RPC endpoints
(``dropin/rpc.py``) reply with it to a call and log it for a cast.
"""

from __future__ import annotations

import decimal
from typing import Any

from oslo_config import cfg

from cloudkitty_proc.exceptions import InvalidRequestError


def _text_or_none(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidRequestError(f"{where}: expected a string or null, got "
                                  f"{type(value).__name__} {value!r}")
    return value


def parse_reset_request(res_data: Any) -> tuple[list[dict[str, Any]], Any]:
    """``reset_state``'s res_data → (the scopes, duplicates dropped, and the
    timestamp as given); InvalidRequestError naming the key at fault."""
    if not isinstance(res_data, dict):
        raise InvalidRequestError(f"res_data: expected an object with 'scopes' and "
                                  f"'last_processed_timestamp', got {type(res_data).__name__}")
    missing = [k for k in ("scopes", "last_processed_timestamp") if k not in res_data]
    if missing:
        raise InvalidRequestError(f"res_data: missing {', '.join(repr(k) for k in missing)}")
    raw = res_data["scopes"]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError(f"res_data.scopes: expected a non-empty list, got {raw!r}")
    scopes: dict[str, dict[str, Any]] = {}
    for i, scope in enumerate(raw):
        where = f"res_data.scopes[{i}]"
        if not isinstance(scope, dict):
            raise InvalidRequestError(f"{where}: expected an object, got "
                                      f"{type(scope).__name__}")
        keys = ("scope_id", "scope_key", "fetcher", "collector")
        absent = [k for k in keys if k not in scope]
        if absent:
            raise InvalidRequestError(f"{where}: missing {', '.join(repr(k) for k in absent)}")
        sid = scope["scope_id"]
        if not isinstance(sid, str) or not sid.strip():
            raise InvalidRequestError(f"{where}.scope_id: expected a non-empty string, "
                                      f"got {sid!r}")
        for key in keys[1:]:
            _text_or_none(scope[key], f"{where}.{key}")
        scopes.setdefault(sid, {k: scope[k] for k in keys})
    return list(scopes.values()), res_data["last_processed_timestamp"]


def _volume(raw: Any, where: str) -> decimal.Decimal:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise InvalidRequestError(f"{where}: expected a decimal string or a number, "
                                  f"got {type(raw).__name__} {raw!r}")
    try:
        value = decimal.Decimal(str(raw).strip())
    except decimal.InvalidOperation:
        raise InvalidRequestError(f"{where}: not a decimal: {raw!r}") from None
    if not value.is_finite():
        raise InvalidRequestError(f"{where}: not a finite decimal: {raw!r}")
    return value


def parse_quote_request(res_data: Any) -> list[dict[str, Any]]:
    """``quote``'s res_data → resources in ``cloudkitty_proc.quote``'s body
    format (``service``, ``desc``, ``volume``, ``unit``); InvalidRequestError
    naming the entry at fault. A ``desc`` holding CloudKitty's internal
    ``groupby``/``metadata`` objects is flattened; the flat keys the API
    sends are kept (CloudKitty's own quote ignores them, §6)."""
    if not isinstance(res_data, dict) or "usage" not in res_data:
        raise InvalidRequestError("res_data: expected an object with 'usage' "
                                  "({service: [{desc, vol: {qty, unit}}]})")
    usage = res_data["usage"]
    if not isinstance(usage, dict):
        raise InvalidRequestError(f"res_data.usage: expected an object, got "
                                  f"{type(usage).__name__}")
    resources = []
    for service, entries in usage.items():
        where = f"res_data.usage[{service!r}]"
        if not isinstance(service, str) or not service:
            raise InvalidRequestError(f"{where}: the service must be a non-empty string")
        if not isinstance(entries, list):
            raise InvalidRequestError(f"{where}: expected a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            at = f"{where}[{i}]"
            vol = entry.get("vol") if isinstance(entry, dict) else None
            if not isinstance(vol, dict) or "qty" not in vol:
                raise InvalidRequestError(f"{at}: expected an object with 'vol': {{'qty', "
                                          f"'unit'}}, got {entry!r}")
            unit = vol.get("unit", "undef")
            if not isinstance(unit, str) or not unit:
                raise InvalidRequestError(f"{at}.vol.unit: expected a non-empty string, "
                                          f"got {unit!r}")
            desc = entry.get("desc") or {}
            if not isinstance(desc, dict):
                raise InvalidRequestError(f"{at}.desc: expected an object, got "
                                          f"{type(desc).__name__}")
            flat: dict[str, Any] = {}
            for key, value in desc.items():
                if key in ("groupby", "metadata") and isinstance(value, dict):
                    flat.update(value)
                elif value is None or isinstance(value, (str, int, float, bool)):
                    flat[key] = value
                else:
                    raise InvalidRequestError(f"{at}.desc[{key!r}]: expected a string, a "
                                              f"number, a boolean or null")
            resources.append({"service": service, "desc": flat,
                              "volume": str(_volume(vol["qty"], f"{at}.vol.qty")),
                              "unit": unit})
    return resources


def native_quote(conf: cfg.ConfigOpts, res_data: Any, chain: list | None = None
                 ) -> decimal.Decimal:
    """CloudKitty's quote priced by our own quote path and ``[rating]
    processors`` (``chain`` when given): used until the CloudKitty-database
    rules (``RULES_MODULE``) are installed, and by the tests."""
    from cloudkitty_proc import quote as quote_mod

    return quote_mod.quote(conf, {"resources": parse_quote_request(res_data)}, chain=chain)


