"""PromQL evaluation, the way Prometheus 2.x computes it, for the ``file``
collector (which answers CloudKitty's query from samples read from files).

* :data:`OVER_TIME`, :data:`AGGREGATE` and :data:`QUERY_FUNCTIONS` compute
  ``<agg>_over_time``, ``<agg>(...) by (...)`` and the query functions the
  way Prometheus 2.x does, float operation for float operation (Neumaier /
  Kahan summation in ``*_over_time``, incremental mean and Welford variance
  across series, population standard deviation), so that the file collector
  returns the very numbers a Prometheus server returns for the same samples.
* :func:`series_sort_key` is Prometheus' series order.
* :func:`format_value` renders a float the way Prometheus' JSON API does.

The query text itself is :mod:`cloudkitty_proc.promql`'s.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable, Sequence

# --------------------------------------------------------------------------
# Value formatting
# --------------------------------------------------------------------------

def format_value(value: float) -> str:
    """A sample value as Prometheus' JSON API writes it.

    Prometheus (util/jsonutil.MarshalValue) uses Go's
    ``strconv.FormatFloat(v, 'f', -1, 64)``: the shortest decimal that
    reads back as the same float, without exponent, except below 1e-6 and
    from 1e21 up, where it uses the ``'e'`` form (``1e-07``, ``1.5e+21``).
    NaN and infinities are ``NaN``, ``+Inf``, ``-Inf``. Python's ``repr``
    gives the same shortest digits.
    """
    if value != value:
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    text = repr(value)
    mag = abs(value)
    if mag != 0 and (mag < 1e-6 or mag >= 1e21):
        return text                        # repr is already d.ddde±XX
    if "e" in text:
        text = format(decimal.Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# --------------------------------------------------------------------------
# Prometheus arithmetic
# --------------------------------------------------------------------------

_isinf = math.isinf
_isnan = math.isnan


def _kahan_inc(inc: float, total: float, c: float) -> tuple[float, float]:
    # promql/functions.go kahanSumInc (Neumaier's variant).
    t = total + inc
    if abs(total) >= abs(inc):
        c += (total - t) + inc
    else:
        c += (inc - t) + total
    return t, c


def _sqrt(x: float) -> float:
    if x != x or x < 0:
        return math.nan
    return math.sqrt(x)


def _avg_over_time(values: Sequence[float]) -> float:
    mean = count = c = 0.0
    for v in values:
        count += 1
        if _isinf(mean):
            if _isinf(v) and (mean > 0) == (v > 0):
                continue
            if not _isinf(v) and not _isnan(v):
                continue
        mean, c = _kahan_inc(v / count - mean / count, mean, c)
    if _isinf(mean):
        return mean
    return mean + c


def _sum_over_time(values: Sequence[float]) -> float:
    total = c = 0.0
    for v in values:
        total, c = _kahan_inc(v, total, c)
    if _isinf(total):
        return total
    return total + c


def _max_over_time(values: Sequence[float]) -> float:
    out = values[0]
    for v in values:
        if v > out or _isnan(out):
            out = v
    return out


def _min_over_time(values: Sequence[float]) -> float:
    out = values[0]
    for v in values:
        if v < out or _isnan(out):
            out = v
    return out


def _var_over_time(values: Sequence[float]) -> float:
    count = mean = c_mean = aux = c_aux = 0.0
    for v in values:
        count += 1
        delta = v - (mean + c_mean)
        mean, c_mean = _kahan_inc(delta / count, mean, c_mean)
        aux, c_aux = _kahan_inc(delta * (v - (mean + c_mean)), aux, c_aux)
    return (aux + c_aux) / count


Reducer = Callable[[Sequence[float]], float]


def _reducers(avg: Reducer, max_: Reducer, min_: Reducer, var: Reducer,
              sum_: Reducer) -> dict[str, Reducer]:
    """The table of one family of functions, by aggregation name (count
    and stddev derived)."""
    return {"avg": avg, "count": lambda values: float(len(values)), "max": max_,
            "min": min_, "stddev": lambda values: _sqrt(var(values)), "stdvar": var,
            "sum": sum_}


OVER_TIME = _reducers(_avg_over_time, _max_over_time, _min_over_time, _var_over_time,
                      _sum_over_time)
"""``<agg>_over_time`` over the samples (in time order) of one series."""


def _agg_sum(values: Sequence[float]) -> float:
    out = values[0]
    for v in values[1:]:
        out += v
    return out


def _agg_avg(values: Sequence[float]) -> float:
    mean = values[0]
    count = 1
    for v in values[1:]:
        count += 1
        if _isinf(mean):
            if _isinf(v) and (mean > 0) == (v > 0):
                continue
            if not _isinf(v) and not _isnan(v):
                continue
        mean += v / count - mean / count
    return mean


def _agg_max(values: Sequence[float]) -> float:
    out = values[0]
    for v in values[1:]:
        if out < v or _isnan(out):
            out = v
    return out


def _agg_min(values: Sequence[float]) -> float:
    out = values[0]
    for v in values[1:]:
        if out > v or _isnan(out):
            out = v
    return out


def _agg_var(values: Sequence[float]) -> float:
    mean = values[0]
    total = 0.0
    count = 1
    for v in values[1:]:
        count += 1
        delta = v - mean
        mean += delta / count
        total += delta * (v - mean)
    return total / count


AGGREGATE = _reducers(_agg_avg, _agg_max, _agg_min, _agg_var, _agg_sum)
"""``<agg>(...)`` across the series of one group, in Prometheus' series
order (labels sorted, see :func:`series_sort_key`)."""


def _floor(x: float) -> float:
    # Go keeps the sign of zero: Floor(-0) = -0.
    if not math.isfinite(x):
        return x
    out = float(math.floor(x))
    return math.copysign(0.0, x) if out == 0 else out


def _ceil(x: float) -> float:
    # Go keeps the sign of zero: Ceil(-0.5) = -0.
    if not math.isfinite(x):
        return x
    out = float(math.ceil(x))
    return math.copysign(0.0, x) if out == 0 else out


def _round(x: float) -> float:
    # Go: math.Floor(v*toNearestInverse+0.5) / toNearestInverse, toNearest=1
    return _floor(x * 1.0 + 0.5) / 1.0


_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_L1 = 6.666666666666735130e-01
_L2 = 3.999999999940941908e-01
_L3 = 2.857142874366239149e-01
_L4 = 2.222219843214978396e-01
_L5 = 1.818357216161805012e-01
_L6 = 1.531383769920937332e-01
_L7 = 1.479819860511658591e-01
_SQRT2_2 = float("0.707106781186547524400844362104849039")


def _ln(x: float) -> float:
    """Go's math.Log (FreeBSD's e_log.c), bit for bit; glibc's log differs
    from it in the last bit for some inputs."""
    if x != x or x == math.inf:
        return x
    if x < 0:
        return math.nan
    if x == 0:
        return -math.inf
    f1, ki = math.frexp(x)
    if f1 < _SQRT2_2:
        f1 *= 2
        ki -= 1
    f = f1 - 1
    k = float(ki)
    s = f / (2 + f)
    s2 = s * s
    s4 = s2 * s2
    t1 = s2 * (_L1 + s4 * (_L3 + s4 * (_L5 + s4 * _L7)))
    t2 = s4 * (_L2 + s4 * (_L4 + s4 * _L6))
    r = t1 + t2
    hfsq = 0.5 * f * f
    return k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f)


# Go's constants 1/Ln2 and 1/Ln10, computed exactly then rounded once
# (1/math.log(10) in Python rounds twice and is one bit off).
_LOG2E = float("1.442695040888963407359924681001892137")
_LOG10E = float("0.434294481903251827651128918916605082")


def _log2(x: float) -> float:
    # Go: frac, exp := Frexp(x); if frac == 0.5 { return exp-1 }; Log(frac)*(1/Ln2) + exp
    if x != x or x <= 0 or x == math.inf:
        return _ln(x)
    frac, exp = math.frexp(x)
    if frac == 0.5:
        return float(exp - 1)
    return _ln(frac) * _LOG2E + float(exp)


def _log10(x: float) -> float:
    return _ln(x) * _LOG10E


def _exp(x: float) -> float:
    # Go's amd64 Exp is assembly (FMA when the CPU has it): it and glibc
    # disagree in the last bit for ~5 % of inputs, which the rounding of
    # quantities to 9 significant digits hides.
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


QUERY_FUNCTIONS: dict[str, Callable[[float], float]] = {
    "abs": abs,
    "ceil": _ceil,
    "exp": _exp,
    "floor": _floor,
    "ln": _ln,
    "log2": _log2,
    "log10": _log10,
    "round": _round,
    "sqrt": _sqrt,
}
"""The ``query_function`` values, as Go's math package computes them (bit
for bit, checked against Prometheus 2.42, except ``exp``: see _exp)."""


def series_sort_key(name: str, labels: Sequence[tuple[str, str]]) -> tuple:
    """Prometheus' series order (labels.Compare on the full label set)."""
    return tuple(sorted((*labels, ("__name__", name))))
