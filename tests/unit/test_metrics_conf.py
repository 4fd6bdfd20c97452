"""metrics.yml: CloudKitty's schema, conversion and mutate."""

from __future__ import annotations

import decimal
import random

import pytest

from cloudkitty_proc import metrics_conf
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, load_metrics_conf, parse_metrics

D = decimal.Decimal


def one(body, **kw):
    return parse_metrics({"metrics": {"m": body}}, **kw).metrics[0]


def test_defaults_and_scope_key_added_to_groupby():
    m = one({"unit": "u", "groupby": ["id"]}, extra_args_schema=PROMQL_EXTRA_ARGS)
    assert m.groupby == ("id", "project_id")
    assert m.metadata == ()
    assert m.mutate == "NONE"
    assert m.usage_type == "m"
    assert m.extra_args == {"aggregation_method": "max", "query_prefix": "", "query_suffix": ""}


def test_list_of_definitions_with_alt_names():
    conf = parse_metrics({"metrics": {"m": [
        {"unit": "a", "alt_name": "x"}, {"unit": "b", "alt_name": "y"}]}})
    assert [d.usage_type for d in conf] == ["x", "y"]


def test_same_usage_type_twice_is_refused():
    with pytest.raises(ConfigError, match="usage type 'x'"):
        parse_metrics({"metrics": {"m": {"unit": "a", "alt_name": "x"},
                                   "n": {"unit": "b", "alt_name": "x"}}})


@pytest.mark.parametrize("factor,offset,raw,want", [
    (1, 0, "3", D(3)),
    ("1/1024", 0, "102400", D(100)),
    (0.5, 2, "3", D("3.5")),
    (1, 0, "0.1234567891", D("0.123456789")),  # CloudKitty's 9-digit context
    (1, 0, "1073741824000", D("1.07374182E+12")),
])
def test_conversion_like_cloudkitty(factor, offset, raw, want):
    m = one({"unit": "u", "factor": factor, "offset": offset})
    assert m.convert(raw) == want


@pytest.mark.parametrize("mode,raw,want", [
    ("NUMBOOL", "5", D("1.0")), ("NUMBOOL", "0", D("0.0")),
    ("NOTNUMBOOL", "0", D("1.0")), ("NOTNUMBOOL", "2", D("0.0")),
    ("FLOOR", "2.7", D(2)), ("CEIL", "2.1", D(3)),
])
def test_mutate(mode, raw, want):
    assert one({"unit": "u", "mutate": mode}).convert(raw) == want


def test_mutate_map():
    m = one({"unit": "u", "mutate": "MAP", "mutate_map": {0: 0, 1: 10, 2.5: 7}})
    assert m.convert("1") == 10
    assert m.convert("2.5") == 7
    assert m.convert("3") == 0


@pytest.mark.parametrize("raw", ["NaN", "+Inf", "abc", ""])
def test_non_finite_values_are_errors(raw):
    m = one({"unit": "u"})
    for _ in range(2):   # errors are not cached
        with pytest.raises(ValueError):
            m.convert(raw)


def _reference_convert(m, raw):
    """convert() as it was written first: a localcontext per value."""
    value = D(raw) if not isinstance(raw, float) else D(repr(raw))
    if not value.is_finite():
        raise ValueError(raw)
    with decimal.localcontext(metrics_conf._CONVERT_CTX):
        qty = (+value) * m._dfactor + m._doffset
    return metrics_conf.to_decimal(m._mutate(qty))


def _raw_values():
    rng = random.Random(7)
    values = ["0", "-0", "1", "0.0", "1.50", "3E+2", "1e-7", "2.5e-10", "1.5e+21",
              "1073741824000", "0.1234567891", "999999999.5", "123456789012345678",
              "-3.25", "0.000000001", "4.9999999995", 0.1, 1.0, 1e21, 3, D("1.0"), D("12.345")]
    for _ in range(300):
        mantissa = rng.randint(0, 10 ** rng.randint(1, 15))
        values.append(f"{mantissa}e{rng.randint(-12, 12)}")
        values.append(str(mantissa / 10 ** rng.randint(0, 9)))
        values.append(repr(rng.random() * 10 ** rng.randint(-3, 12)))
    return values


@pytest.mark.parametrize("body", [
    {"unit": "u"},
    {"unit": "u", "factor": "1/1073741824"},
    {"unit": "u", "factor": "1/1024", "offset": 2},
    {"unit": "u", "factor": 0.1, "offset": "1/3"},
    {"unit": "u", "factor": 3600, "offset": -1},
    {"unit": "u", "mutate": "NUMBOOL"},
    {"unit": "u", "mutate": "NOTNUMBOOL"},
    {"unit": "u", "factor": "1/3", "mutate": "FLOOR"},
    {"unit": "u", "factor": "1/3", "mutate": "CEIL"},
    {"unit": "u", "mutate": "MAP", "mutate_map": {0: 0, 1: 10, "2.5": 7}},
])
def test_convert_is_bit_identical_to_a_localcontext_per_value(body):
    """The context methods and the cache change nothing, to the exponent."""
    m = one(body)
    for raw in _raw_values():
        want = _reference_convert(m, raw)
        for _ in range(2):   # computed, then (str values) from the cache
            got = m.convert(raw)
            assert type(got) is D
            assert got.as_tuple() == want.as_tuple(), (body, raw, got, want)


def test_convert_cache_is_bounded_and_keyed_by_strings(monkeypatch):
    monkeypatch.setattr(metrics_conf, "CONVERT_CACHE_SIZE", 8)
    m = one({"unit": "u", "factor": "1/1024"})
    for n in range(50):
        assert m.convert(str(n * 1024)) == n
        assert len(m._cache) <= 8
    # 1, 1.0 and Decimal("1.0") are equal keys but convert differently
    m = one({"unit": "u"})
    assert str(m.convert("1.0")) == "1.0"
    assert str(m.convert(1)) == "1"
    assert str(m.convert("1")) == "1"
    assert str(m.convert(1.0)) == "1.0"
    assert set(m._cache) == {"1.0", "1"}
    # each definition has its own cache
    assert one({"unit": "u", "factor": 2}).convert("1.0") == 2


@pytest.mark.parametrize("body,needle", [
    ({}, "key 'unit': required key missing"),
    ({"unit": "u", "factor": "abc"}, "key 'factor'"),
    ({"unit": "u", "mutate": "SQUARE"}, "key 'mutate'"),
    ({"unit": "u", "mutate": "MAP"}, "key 'mutate_map'"),
    ({"unit": "u", "colour": 1}, "key 'colour': unknown key"),
    ({"unit": "u", "extra_args": {"aggregation_method": "median"}},
     "key 'extra_args.aggregation_method'"),
    ({"unit": "u", "groupby": "id"}, "key 'groupby'"),
])
def test_errors_name_metric_and_key(body, needle):
    with pytest.raises(ConfigError) as err:
        parse_metrics({"metrics": {"cpu": body}}, path="/etc/m.yml",
                      extra_args_schema=PROMQL_EXTRA_ARGS)
    msg = str(err.value)
    assert msg.startswith("/etc/m.yml: metric 'cpu'")
    assert needle in msg


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="metrics file not found"):
        load_metrics_conf(str(tmp_path / "nope.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("metrics:\n  cpu: [unit: x\n")
    with pytest.raises(ConfigError, match=r"bad.yml: invalid YAML: line \d+"):
        load_metrics_conf(str(bad))
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="top-level key 'metrics' is missing"):
        load_metrics_conf(str(empty))


@pytest.mark.parametrize("body,needle", [
    ({"unit": "u", "groupby": ["id", "flavor"], "metadata": ["flavor", "az"]},
     "label(s) 'flavor' in both 'groupby' and 'metadata'"),
    ({"unit": "u", "mutate_map": {}}, "key 'mutate_map': only allowed with mutate: MAP"),
    ({"unit": "u", "mutate": "NUMBOOL", "mutate_map": {1: 2}},
     "key 'mutate_map': only allowed with mutate: MAP"),
], ids=["groupby-and-metadata", "empty-mutate-map", "mutate-map-without-map"])
def test_what_cloudkitty_refuses_is_refused(body, needle):
    """Issue 16 item 7: both were accepted."""
    with pytest.raises(ConfigError) as err:
        parse_metrics({"metrics": {"cpu": body}}, path="/etc/m.yml")
    assert str(err.value).startswith("/etc/m.yml: metric 'cpu'") and needle in str(err.value)
