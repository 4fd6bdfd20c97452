"""metrics.yml: CloudKitty's metric definition format, loaded and validated.

The file maps each metric name to one definition or a non-empty list of
definitions::

    metrics:
      cpu:
        unit: instance
        alt_name: instance
        groupby: [id, user_id]
        metadata: [flavor_name]
        mutate: NUMBOOL
        extra_args: {aggregation_method: max}

Conversion of a collected value follows CloudKitty exactly: the raw value is
read as a Decimal in a context of 9 significant digits rounding half up,
multiplied by ``factor`` and added to ``offset`` in that context, then
mutated (NONE, NUMBOOL, NOTNUMBOOL, FLOOR, CEIL, MAP).

Bounds (refused with the file, metric and key): ``factor``, ``offset`` and
the numbers of ``mutate_map`` are finite, at most ``MAX_NUMBER`` in absolute
value, fractions with a denominator of at most ``MAX_NUMBER``. A converted
quantity must be 0 or between ``MIN_QUANTITY`` and ``MAX_QUANTITY`` in
absolute value; another is refused like a value that is not a number.
"""

from __future__ import annotations

import dataclasses
import decimal
import fractions
import math
from typing import Any

import voluptuous as vol
from cloudkitty_proc import expressions, yamlfile
from cloudkitty_proc.exceptions import ConfigError

MUTATORS = ("NONE", "NUMBOOL", "NOTNUMBOOL", "FLOOR", "CEIL", "MAP")

# CloudKitty's Prometheus collector extra_args. The file collector accepts
# the same keys so that one metrics.yml serves both.
AGGREGATION_METHODS = ("avg", "count", "max", "min", "stddev", "stdvar", "sum")
QUERY_FUNCTIONS = ("abs", "ceil", "exp", "floor", "ln", "log2", "log10",
                   "round", "sqrt")
RANGE_FUNCTIONS = ("changes", "delta", "deriv", "idelta", "irange", "irate",
                   "rate")

PROMQL_EXTRA_ARGS = {
    vol.Required("aggregation_method", default="max"): vol.In(AGGREGATION_METHODS),
    vol.Optional("query_function"): vol.In(QUERY_FUNCTIONS),
    vol.Optional("range_function"): vol.In(RANGE_FUNCTIONS),
    vol.Required("query_prefix", default=""): str,
    vol.Required("query_suffix", default=""): str,
}

_CONVERT_CTX = decimal.Context(prec=9, rounding=decimal.ROUND_HALF_UP)
CONVERT_CACHE_SIZE = 1024
"""Raw values whose conversion a MetricDef remembers (then it starts over)."""


#: the largest absolute value (and fraction denominator) of factor, offset
#: and mutate_map numbers
MAX_NUMBER = 10 ** 15
#: the range of a converted quantity's absolute value (0 aside): its text
#: in storage (format "f") stays under 50 characters
MAX_QUANTITY = decimal.Decimal("1e36")
MIN_QUANTITY = decimal.Decimal("1e-36")


def _number(value: Any) -> int | float | fractions.Fraction:
    if isinstance(value, bool):
        raise vol.Invalid("expected a number, got a boolean")
    number: int | float | fractions.Fraction | None = None
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str) and len(value) <= yamlfile.EXCERPT:
        try:
            number = fractions.Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            pass
    if number is None:
        raise vol.Invalid(f"expected an int, a float or a fraction like "
                          f"\"1/1024\", got {yamlfile.excerpt(value)}")
    if isinstance(number, float) and not math.isfinite(number):
        raise vol.Invalid(f"expected a finite number, got {value!r}")
    if abs(number) > MAX_NUMBER or (isinstance(number, fractions.Fraction)
                                    and number.denominator > MAX_NUMBER):
        raise vol.Invalid(f"{yamlfile.excerpt(value)} is out of range (at most {MAX_NUMBER:.0e} "
                          "in absolute value, denominators included)")
    return number


def _num2decimal(num: int | float | fractions.Fraction) -> decimal.Decimal:
    # Same as cloudkitty.utils.num2decimal: fractions go through float.
    if isinstance(num, fractions.Fraction):
        num = float(num)
    return decimal.Decimal(num)


_NONEMPTY_STR = vol.All(str, vol.Length(min=1))


def _skip_expression(value: Any) -> str:
    """A skip_datapoints_expression: compiled here to refuse it early.

    An empty string is allowed: it turns the global ``[collect]
    skip_datapoints_expression`` off for this metric.
    """
    if not isinstance(value, str):
        raise vol.Invalid(f"expected a string, got {type(value).__name__}")
    if value.strip():
        try:
            expressions.parse_expression(value)
        except expressions.ExpressionError as exc:
            raise vol.Invalid(f"invalid expression {yamlfile.excerpt(value)}: {exc}") from None
    return value

METRIC_SCHEMA = vol.Schema({
    vol.Required("unit"): _NONEMPTY_STR,
    vol.Required("factor", default=1): _number,
    vol.Required("offset", default=0): _number,
    vol.Optional("alt_name"): _NONEMPTY_STR,
    vol.Required("groupby", default=list): [_NONEMPTY_STR],
    vol.Required("metadata", default=list): [_NONEMPTY_STR],
    vol.Required("mutate", default="NONE"): vol.In(MUTATORS),
    vol.Optional("mutate_map"): dict,
    vol.Optional("description"): str,
    vol.Required("extra_args", default=dict): dict,
    vol.Optional("skip_datapoints_expression"): _skip_expression,
})


def to_decimal(value: Any) -> decimal.Decimal:
    """As CloudKitty's DataPoint does: floats go through str()."""
    if isinstance(value, decimal.Decimal):
        return value
    if isinstance(value, float):
        return decimal.Decimal(str(value))
    return decimal.Decimal(value)


@dataclasses.dataclass(frozen=True)
class MetricDef:
    """One definition of a metric (a metric may have several)."""

    name: str
    unit: str
    factor: int | float | fractions.Fraction = 1
    offset: int | float | fractions.Fraction = 0
    alt_name: str | None = None
    groupby: tuple[str, ...] = ()
    metadata: tuple[str, ...] = ()
    mutate: str = "NONE"
    mutate_map: dict | None = None
    description: str | None = None
    extra_args: dict = dataclasses.field(default_factory=dict)
    #: None: the global ``[collect] skip_datapoints_expression`` applies;
    #: "" (or blank): no datapoint of this metric is skipped.
    skip_datapoints_expression: str | None = None

    @property
    def usage_type(self) -> str:
        return self.alt_name or self.name

    @property
    def label(self) -> str:
        """How logs and errors name this definition."""
        if self.alt_name and self.alt_name != self.name:
            return f"{self.name} (as {self.alt_name})"
        return self.name

    def __post_init__(self) -> None:
        object.__setattr__(self, "_dfactor", _num2decimal(self.factor))
        object.__setattr__(self, "_doffset", _num2decimal(self.offset))
        # raw string -> converted quantity: collected values repeat a lot
        # (0, 1, the same sizes and counts), see convert().
        object.__setattr__(self, "_cache", {})
        source = self.skip_datapoints_expression
        object.__setattr__(self, "_skip", expressions.parse_expression(source)
                           if source and source.strip() else None)

    @property
    def skip_expression(self) -> expressions.Expression | None:
        """The compiled per-metric skip expression (None: none or blank)."""
        return self._skip  # type: ignore[attr-defined]

    def convert(self, raw: str | float | int | decimal.Decimal) -> decimal.Decimal:
        """Raw collected value → quantity (factor, offset, mutate).

        Raises ValueError for a value that is not a finite number.

        ``(+value) * factor + offset`` in the 9-digit context, written with
        the context's methods (no ``localcontext`` per value: same result,
        bit for bit); the results of string values are cached (at most
        :data:`CONVERT_CACHE_SIZE`, then the cache starts over).
        """
        cache = self._cache  # type: ignore[attr-defined]
        if type(raw) is str:
            qty = cache.get(raw)
            if qty is not None:
                return qty
        try:
            value = decimal.Decimal(raw) if not isinstance(raw, float) else decimal.Decimal(repr(raw))
        except (decimal.InvalidOperation, TypeError, ValueError):
            raise ValueError(f"not a number: {yamlfile.excerpt(raw)}") from None
        if not value.is_finite():
            raise ValueError(f"not a finite number: {yamlfile.excerpt(raw)}")
        ctx = _CONVERT_CTX
        qty = ctx.add(ctx.multiply(ctx.plus(value), self._dfactor),  # type: ignore[attr-defined]
                      self._doffset)  # type: ignore[attr-defined]
        if self.mutate != "NONE":
            qty = to_decimal(self._mutate(qty))
        if qty and not MIN_QUANTITY <= abs(qty) <= MAX_QUANTITY:
            raise ValueError(f"{yamlfile.excerpt(raw)} converts to {qty:.3e}, out of the "
                             f"accepted range of quantities (0 or {MIN_QUANTITY:.0e} to "
                             f"{MAX_QUANTITY:.0e} in absolute value)")
        if type(raw) is str:
            # Only str keys: 1, 1.0 and Decimal("1.0") are equal keys but
            # do not convert alike.
            if len(cache) >= CONVERT_CACHE_SIZE:
                cache.clear()
            cache[raw] = qty
        return qty

    def scale(self, value: decimal.Decimal, ctx: decimal.Context) -> decimal.Decimal:
        """``value * factor + offset`` in ``ctx``, then mutate: the
        conversion of collectors whose values are numbers, not text (the
        gnocchi collector, with CloudKitty's 28-digit context). No range
        check, no cache."""
        qty = ctx.add(ctx.multiply(value, self._dfactor),  # type: ignore[attr-defined]
                      self._doffset)  # type: ignore[attr-defined]
        if self.mutate != "NONE":
            qty = to_decimal(self._mutate(qty))
        return qty

    def _mutate(self, value: decimal.Decimal) -> Any:
        mode = self.mutate
        if mode == "NONE":
            return value
        if mode == "NUMBOOL":
            return float(value != 0)
        if mode == "NOTNUMBOOL":
            return float(value == 0)
        if mode == "FLOOR":
            return math.floor(value)
        if mode == "CEIL":
            return math.ceil(value)
        # MAP: Decimal, int and float of equal value hash alike.
        return (self.mutate_map or {}).get(value, 0.0)


@dataclasses.dataclass(frozen=True)
class MetricsConf:
    path: str
    metrics: tuple[MetricDef, ...]

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def usage_types(self) -> list[str]:
        return sorted({m.usage_type for m in self.metrics})

    def by_usage_type(self) -> dict[str, MetricDef]:
        return {m.usage_type: m for m in self.metrics}


def _where(path: str, metric: str, index: int | None) -> str:
    where = f"{path}: metric '{metric}'"
    if index is not None:
        where += f" (definition {index})"
    return where


def _invalid_msg(exc: vol.Invalid, prefix: tuple = ()) -> str:
    if isinstance(exc, vol.MultipleInvalid) and exc.errors:
        exc = exc.errors[0]
    path = [*prefix, *(exc.path or [])]
    key = ".".join(str(p) for p in path)
    msg = exc.error_message
    if msg == "extra keys not allowed":
        msg = "unknown key"
    elif msg == "required key not provided":
        msg = "required key missing"
    return f"key '{key}': {msg}" if key else msg


def parse_metrics(data: Any, *, path: str = "<metrics.yml>",
                  scope_key: str = "project_id",
                  extra_args_schema: dict | None = None) -> MetricsConf:
    """Validate a parsed metrics.yml document. Raises ConfigError."""
    if not isinstance(data, dict) or "metrics" not in data:
        raise ConfigError(f"{path}: top-level key 'metrics' is missing")
    extra = set(data) - {"metrics"}
    if extra:
        raise ConfigError(f"{path}: unknown top-level key(s): {', '.join(sorted(map(str, extra)))}")
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        raise ConfigError(f"{path}: 'metrics' must map metric names to definitions "
                          "and hold at least one metric")
    extra_schema = vol.Schema(extra_args_schema or {}, extra=vol.ALLOW_EXTRA
                              if extra_args_schema is None else vol.PREVENT_EXTRA)
    out: list[MetricDef] = []
    seen_types: dict[str, str] = {}
    for name, body in metrics.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: metric name {yamlfile.excerpt(name)} must be a "
                              "non-empty string")
        if isinstance(body, list):
            if not body:
                raise ConfigError(f"{_where(path, name, None)}: an empty list of definitions")
            defs = list(enumerate(body))
        else:
            defs = [(None, body)]
        for index, raw in defs:
            where = _where(path, name, index)
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: a definition must be a mapping")
            try:
                conf = METRIC_SCHEMA(raw)
            except vol.Invalid as exc:
                raise ConfigError(f"{where}: {_invalid_msg(exc)}") from None
            try:
                extra_args = extra_schema(conf["extra_args"])
            except vol.Invalid as exc:
                raise ConfigError(f"{where}: {_invalid_msg(exc, ('extra_args',))}") from None
            if conf["mutate"] == "MAP":
                mmap = conf.get("mutate_map")
                if not mmap:
                    raise ConfigError(f"{where}: key 'mutate_map': required (and "
                                      "non-empty) when mutate is MAP")
                for k, v in mmap.items():
                    try:
                        _number(k)
                        _number(v)
                    except vol.Invalid as exc:
                        raise ConfigError(f"{where}: key 'mutate_map.{k}': {exc.msg}") from None
            elif "mutate_map" in conf:  # CloudKitty refuses it too, even empty
                raise ConfigError(f"{where}: key 'mutate_map': only allowed with mutate: MAP")
            both = sorted(set(conf["groupby"]) & set(conf["metadata"]))
            if both:
                raise ConfigError(f"{where}: label(s) {', '.join(map(repr, both))} in both "
                                  "'groupby' and 'metadata' (CloudKitty refuses it too)")
            groupby = list(dict.fromkeys(conf["groupby"]))
            if scope_key not in groupby:
                groupby.append(scope_key)
            mdef = MetricDef(
                name=name,
                unit=conf["unit"],
                factor=conf["factor"],
                offset=conf["offset"],
                alt_name=conf.get("alt_name"),
                groupby=tuple(groupby),
                metadata=tuple(dict.fromkeys(conf["metadata"])),
                mutate=conf["mutate"],
                mutate_map={_map_key(k): _num2decimal(_number(v))
                            for k, v in conf["mutate_map"].items()}
                if conf.get("mutate_map") else None,
                description=conf.get("description"),
                extra_args=extra_args,
                skip_datapoints_expression=conf.get("skip_datapoints_expression"),
            )
            other = seen_types.get(mdef.usage_type)
            if other is not None:
                raise ConfigError(
                    f"{where}: usage type '{mdef.usage_type}' is already produced by "
                    f"metric '{other}'; give one of them another alt_name")
            seen_types[mdef.usage_type] = name
            out.append(mdef)
    return MetricsConf(path=path, metrics=tuple(out))


def _map_key(key: Any) -> Any:
    if isinstance(key, str):
        return decimal.Decimal(key) if "/" not in key else _num2decimal(fractions.Fraction(key))
    return key


def load_metrics_conf(path: str, *, scope_key: str = "project_id",
                      extra_args_schema: dict | None = None) -> MetricsConf:
    """Read and validate a metrics.yml file. Raises ConfigError."""
    data = yamlfile.load(path, what="metrics file", hint="set [collect] metrics_conf")
    return parse_metrics(data, path=path, scope_key=scope_key,
                         extra_args_schema=extra_args_schema)
