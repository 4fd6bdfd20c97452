"""Hashmap rules: validation messages, reload, validity windows, per-scope
overrides and frame processing (CONTRACTS.md §4)."""

from __future__ import annotations

import datetime
import logging
import pathlib
import textwrap
from decimal import Decimal as D

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.rating.hashmap import (
    HashMapProcessor,
    load_rules,
    price_point,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_RULES = REPO / "etc" / "cloudkitty-proc" / "rating.yml"
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOUR = datetime.timedelta(hours=1)


def write(tmp_path: pathlib.Path, text: str, name: str = "rating.yml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def point(qty="1", price="0", groupby=None, metadata=None) -> DataPoint:
    return DataPoint("unit", D(qty), D(price), dict(groupby or {}),
                     dict(metadata or {}))


def make_conf(path: pathlib.Path) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf.set_override("rules_file", str(path), group="hashmap")
    return conf


def load_error(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

# Each case: a rules file and the texts its ConfigError must contain (the
# message also names the file: load_error checks it).
INVALID_RULES = [
    pytest.param("""
            hashmap:
              services:
                instance:
                  fields:
                    flavor_name:
                      mappings:
                        - {value: m1.tiny, cost: "1"}
                        - {value: m1.small, cost: "2", colour: red}
        """, (
        "service 'instance'",
        "field 'flavor_name'",
        "mappings[1]",
        "unknown key 'colour'",
    ), id="unknown_key_in_field_mapping"),
    pytest.param("""
            extra: 1
            hashmap:
              services:
                instance:
                  mapings: []
                  fields:
                    size:
                      treshold: []
        """, (
        "unknown top-level key 'extra'",
        "service 'instance': unknown key 'mapings'",
        "service 'instance', field 'size': unknown key 'treshold'",
    ), id="unknown_keys_at_every_level"),
    pytest.param("""
            hashmap:
              services:
                volume.size:
                  mappings:
                    - {cost: "1", type: flat}
                    - {cost: "2", type: percent, group: other}
        """, (
        "service 'volume.size', mappings[1]",
        "unknown type 'percent'",
    ), id="unknown_type"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  fields:
                    size:
                      thresholds:
                        - {level: "ten", cost: "1"}
                        - {level: "-2", cost: "1", group: g}
        """, (
        "field 'size', thresholds[0]: 'level' is not a decimal",
        "field 'size', thresholds[1]: 'level' must be >= 0",
    ), id="bad_decimal_level_and_negative_level"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  mappings:
                    - {type: flat}
        """, (
        "service 'instance', mappings[0]: 'cost' is missing",
    ), id="missing_cost"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  thresholds:
                    - {level: "1", cost: "1"}
                    - {cost: "1", group: other}
        """, (
        "service 'instance', thresholds[1]: 'level' is missing",
    ), id="level_missing_on_threshold"),
    pytest.param("""
            hashmap:
              services:
                image.size:
                  fields:
                    disk_format:
                      mappings:
                        - {cost: "1"}
        """, (
        "service 'image.size', field 'disk_format', mappings[0]",
        "'value' is missing",
    ), id="value_missing_on_field_mapping"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  fields:
                    vcpus:
                      mappings:
                        - {value: 2, cost: "1"}
        """, (
        "field 'vcpus', mappings[0]: 'value' must be a string",
    ), id="value_must_be_a_string"),
    pytest.param("""
            hashmap:
              services:
                ip.floating:
                  mappings:
                    - {value: active, cost: "1"}
        """, (
        "service 'ip.floating', mappings[0]",
        "'value' given on a service mapping",
    ), id="value_given_on_service_mapping"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  mappings:
                    - {cost: "1", start: "2026-01-02T00:00:00Z", end: "2026-01-01T00:00:00Z"}
                    - {cost: "1", group: g, start: "2026-01-02T00:00:00Z", end: "2026-01-02T00:00:00Z"}
        """, (
        "service 'instance', mappings[0]: 'end'",
        "service 'instance', mappings[1]: 'end'",
        "must be after 'start'",
    ), id="end_before_or_at_start"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  fields:
                    flavor_name:
                      mappings:
                        - {value: a, cost: "1", start: "yesterday"}
                        - {value: b, cost: "1", end: 12}
        """, (
        "field 'flavor_name', mappings[0]: 'start' is not an ISO 8601 time",
        "field 'flavor_name', mappings[1]: 'end' is not an ISO 8601 time",
    ), id="bad_timestamps"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  mappings:
                    - {cost: "1", group: compute}
                    - {cost: "2", group: other}
                    - {cost: "3", group: compute, start: "2026-01-01T00:00:00Z"}
        """, (
        "service 'instance', mappings[2]: duplicate of mappings[0]",
        "group 'compute'",
        "global",
    ), id="duplicate_global_service_mapping"),
    pytest.param("""
            hashmap:
              services:
                instance:
                  fields:
                    flavor_name:
                      mappings:
                        - {value: m1.tiny, cost: "1", scope: p1, end: "2026-01-02T00:00:00Z"}
                        - {value: m1.tiny, cost: "2", scope: p1, start: "2026-01-01T12:00:00Z"}
        """, (
        "field 'flavor_name', mappings[1]: duplicate of mappings[0]",
        "scope 'p1'",
    ), id="duplicate_same_scope_field_mapping_overlapping"),
    pytest.param("""
            hashmap:
              services:
                volume.size:
                  thresholds:
                    - {level: "10", cost: "1"}
                    - {level: 10.0, cost: "2"}
        """, (
        "service 'volume.size', thresholds[1]: duplicate of thresholds[0]",
    ), id="duplicate_threshold_level_compared_as_decimal"),
    pytest.param("""
            hashmap:
              services:
                a:
                  mappings: [{cost: x}]
                b:
                  thresholds: [{cost: "1"}]
        """, (
        "2 problems",
        "service 'a', mappings[0]",
        "service 'b', thresholds[0]",
    ), id="every_problem_is_reported"),
]


@pytest.mark.parametrize("text, expected", INVALID_RULES)
def test_invalid_rules_are_reported(tmp_path, text, expected):
    msg = load_error(tmp_path, text)
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("cost", ['"abc"', '"NaN"', '"Infinity"', "true", "[1]"])
def test_bad_decimal_cost(tmp_path, cost):
    msg = load_error(tmp_path, f"""
        hashmap:
          services:
            instance:
              thresholds:
                - {{level: "1", cost: {cost}}}
    """)
    assert "service 'instance', thresholds[0]" in msg
    assert "'cost' is not a decimal" in msg


def test_same_key_allowed_when_disjoint_or_different_origin(tmp_path):
    path = write(tmp_path, """
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "1", end: "2026-01-02T00:00:00Z"}
                - {cost: "2", start: "2026-01-02T00:00:00Z"}
                - {cost: "3", scope: p1}
                - {cost: "4", scope: p2}
              fields:
                flavor_name:
                  mappings:
                    - {value: m1.tiny, cost: "1"}
                    - {value: m1.tiny, cost: "1", group: other}
                    - {value: m1.small, cost: "1"}
    """)
    rules = load_rules(path)
    assert rules.rule_count == 7


@pytest.mark.parametrize("text, expected", [
    ("", "the file is empty"),
    ("hashmap: {services: {}}\n", "must be a non-empty mapping"),
    ("hashmap: {}\n", "must be a non-empty mapping"),
    ("services: {}\n", "unknown top-level key 'services'"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("hashmap: {services: {instance: {mappings: [}}\n", "invalid YAML: line 1"),
    ("hashmap: {services: {instance: {mappings: {cost: 1}}}}\n",
     "service 'instance', mappings: must be a list"),
])
def test_document_level_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=None) as info:
        load_rules(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match="nope.yml: cannot read rating rules"):
        load_rules(path)


def test_check_raises_config_error(tmp_path):
    good = write(tmp_path, "hashmap: {services: {instance: {mappings: [{cost: '1'}]}}}\n")
    proc = HashMapProcessor(make_conf(good))
    proc.check()
    good.write_text("hashmap: {services: {instance: {mappings: [{cost: '1', type: x}]}}}\n")
    with pytest.raises(ConfigError, match="unknown type 'x'"):
        proc.check()


def test_constructor_refuses_invalid_file(tmp_path):
    bad = write(tmp_path, "hashmap: {services: {}}\n")
    with pytest.raises(ConfigError):
        HashMapProcessor(make_conf(bad))


# --------------------------------------------------------------------------
# reload()
# --------------------------------------------------------------------------

def frame_of(usage_type, points, scope="p1", begin=T0) -> DataFrame:
    return DataFrame(scope, begin, begin + HOUR, {usage_type: list(points)})


def rate_one(proc, usage_type, pt, scope="p1", begin=T0) -> D:
    return proc.process(frame_of(usage_type, [pt], scope, begin)).points(usage_type)[0].price


def test_reload_keeps_old_rules_on_error_and_applies_new_ones(tmp_path, caplog):
    path = write(tmp_path, "hashmap: {services: {instance: {mappings: [{cost: '1'}]}}}\n")
    proc = HashMapProcessor(make_conf(path))
    assert rate_one(proc, "instance", point("2")) == D("2")

    old = proc.rules
    path.write_text("hashmap: {services: {instance: {mappings: [{cost: oops}]}}}\n")
    with caplog.at_level(logging.ERROR, logger="cloudkitty_proc.rating.hashmap"):
        with pytest.raises(ConfigError, match="'cost' is not a decimal"):
            proc.reload()
    assert proc.rules is old
    assert rate_one(proc, "instance", point("2")) == D("2")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "not reloaded" in errors[0].getMessage()
    assert "'cost' is not a decimal" in errors[0].getMessage()

    path.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        proc.reload()
    assert rate_one(proc, "instance", point("2")) == D("2")

    path.write_text("hashmap: {services: {instance: {mappings: [{cost: '3'}]},"
                    " volume.size: {mappings: [{cost: '0.5'}]}}}\n")
    proc.reload()
    assert proc.rules is not old
    assert rate_one(proc, "instance", point("2")) == D("6")
    assert rate_one(proc, "volume.size", point("10")) == D("5")


# --------------------------------------------------------------------------
# Validity windows
# --------------------------------------------------------------------------

WINDOWS = """
    hashmap:
      services:
        instance:
          mappings:
            - {cost: "1", end: "2026-01-01T10:00:00Z"}
            - {cost: "2", start: "2026-01-01T10:00:00Z", end: "2026-01-01T12:00:00+00:00"}
            - {cost: "3", start: 2026-01-01T12:00:00Z}
            - {cost: "100", group: promo, start: "2026-01-01T11:00:00", end: "2026-01-01T13:00:00+01:00"}
"""


@pytest.mark.parametrize("hour, expected", [
    (0, "1"),
    (9, "1"),
    (10, "2"),     # start inclusive, previous end exclusive
    (11, "102"),   # naive start is UTC
    (12, "3"),     # end exclusive (13:00+01:00 == 12:00Z)
    (13, "3"),
    (240, "3"),
])
def test_validity_windows_at_period_edges(tmp_path, hour, expected):
    rules = load_rules(write(tmp_path, WINDOWS))
    begin = T0 + hour * HOUR
    assert price_point(rules, "instance", "p1", begin, point("1")) == D(expected)
    proc = HashMapProcessor(make_conf(tmp_path / "rating.yml"))
    assert rate_one(proc, "instance", point("1"), begin=begin) == D(expected)


def test_validity_just_before_boundary(tmp_path):
    rules = load_rules(write(tmp_path, WINDOWS))
    edge = datetime.datetime(2026, 1, 1, 10, tzinfo=UTC)
    eps = datetime.timedelta(microseconds=1)
    assert price_point(rules, "instance", None, edge - eps, point()) == D("1")
    assert price_point(rules, "instance", None, edge, point()) == D("2")
    assert price_point(rules, "instance", None, "2026-01-01T10:00:00Z", point()) == D("2")
    assert price_point(rules, "instance", None, "2026-01-01T11:00:00+01:00", point()) == D("2")


def test_scope_rule_window_falls_back_to_global(tmp_path):
    rules = load_rules(write(tmp_path, """
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "1"}
                - {cost: "5", scope: p1, start: "2026-01-01T05:00:00Z", end: "2026-01-01T06:00:00Z"}
    """))
    prices = [price_point(rules, "instance", "p1", T0 + h * HOUR, point())
              for h in (4, 5, 6)]
    assert prices == [D(1), D(5), D(1)]
    assert price_point(rules, "instance", "p2", T0 + 5 * HOUR, point()) == D(1)


# --------------------------------------------------------------------------
# Per-scope overrides
# --------------------------------------------------------------------------

OVERRIDES = """
    hashmap:
      services:
        instance:
          mappings:
            - {cost: "1", group: compute}
            - {cost: "10", group: licence}
            - {cost: "4", group: compute, scope: p1}
          thresholds:
            - {level: "1", cost: "1000", group: compute}
            - {level: "5", cost: "100", group: compute}
            - {level: "5", cost: "7", group: compute, scope: p1}
          fields:
            flavor_name:
              mappings:
                - {value: m1.small, cost: "20", group: flavor}
                - {value: m1.large, cost: "40", group: flavor}
                - {value: m1.small, cost: "2", type: rate, group: compute}
                - {value: m1.small, cost: "0.5", type: rate, group: flavor, scope: p1}
"""


def test_scope_override_replaces_only_the_same_key(tmp_path):
    rules = load_rules(write(tmp_path, OVERRIDES))

    def price(scope, qty, flavor=None):
        md = {"flavor_name": flavor} if flavor else {}
        return price_point(rules, "instance", scope, T0, point(qty, metadata=md))

    # global (p2): compute flat 1 (x rate 2 for m1.small), licence 10,
    # flavor 20 / 40
    assert price("p2", "0.5", "m1.small") == D("0.5") * (1 * 2 + 10 + 20)
    assert price("p2", "0.5", "m1.large") == D("0.5") * (1 + 10 + 40)
    # p1: the compute service mapping (key: group) is replaced by flat 4;
    # licence is kept; the field mapping (flavor, m1.small) becomes a rate
    # 0.5 (flavor has no flat left: 0) while (compute, m1.small) and
    # (flavor, m1.large) are kept
    assert price("p1", "0.5", "m1.small") == D("0.5") * (4 * 2 + 10 + 0)
    assert price("p1", "0.5", "m1.large") == D("0.5") * (4 + 10 + 40)
    # threshold key (compute, 5) replaced for p1; (compute, 1) kept
    assert price("p2", "6") == 1 * 6 + 100 + 10 * 6
    assert price("p1", "6") == 4 * 6 + 7 + 10 * 6
    assert price("p2", "2") == 1 * 2 + 1000 + 10 * 2
    assert price("p1", "2") == 4 * 2 + 1000 + 10 * 2


def test_service_mappings_key_is_the_group(tmp_path):
    # Two global service mappings of one group are one key: refused.
    msg = load_error(tmp_path, """
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "1", group: compute}
                - {cost: "2", type: rate, group: compute}
    """)
    assert "mappings[1]: duplicate of mappings[0]" in msg


def test_override_is_per_scope(tmp_path):
    rules = load_rules(write(tmp_path, """
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "1"}
                - {cost: "2", scope: p1}
                - {cost: "3", scope: p2}
    """))
    assert [price_point(rules, "instance", s, T0, point()) for s in
            ("p1", "p2", "p3", None)] == [D(2), D(3), D(1), D(1)]


# --------------------------------------------------------------------------
# Semantics details
# --------------------------------------------------------------------------

def test_group_semantics(tmp_path):
    rules = load_rules(write(tmp_path, """
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "0.5", group: only_rate, type: rate}
                - {cost: "2", group: g}
              thresholds:
                - {level: "0", cost: "3", group: only_threshold}
              fields:
                flavor_name:
                  mappings:
                    - {value: m1.large, cost: "5", group: g}
                    - {value: m1.tiny, cost: "1", group: g}
                az:
                  mappings:
                    - {value: az1, cost: "1.5", type: rate, group: g}
    """))
    # only_rate: flat 0 -> 0; only_threshold: 0 + 3; g: max(2, 5) * 1.5 * qty
    pt = point("2", price="1", metadata={"flavor_name": "m1.large", "az": "az1"})
    assert price_point(rules, "instance", None, T0, pt) == D(1) + D(3) + D(5) * D("1.5") * 2
    # flat keeps the max: m1.tiny (1) does not lower the service flat (2)
    pt = point("2", groupby={"flavor_name": "m1.tiny"})
    assert price_point(rules, "instance", None, T0, pt) == D(3) + D(4)


def test_thresholds_compete_per_group(tmp_path):
    rules = load_rules(write(tmp_path, """
        hashmap:
          services:
            volume.size:
              mappings:
                - {cost: "1"}
              thresholds:
                - {level: "10", cost: "2", type: rate}
                - {level: "50", cost: "100"}
              fields:
                size:
                  thresholds:
                    - {level: "10", cost: "0.5"}
                    - {level: "20", cost: "3", type: rate}
    """))
    def price(qty, size=None):
        md = {} if size is None else {"size": size}
        return price_point(rules, "volume.size", None, T0, point(qty, metadata=md))
    assert price("5") == D(5)
    # service level 10 vs field level 10: tie, the service threshold wins
    assert price("10", "10") == D(10) * 2
    # field level 20 beats service level 10: applied to rate before qty
    assert price("10", "25") == D(1) * 3 * 10
    # service level 50 beats field level 20: added after qty
    assert price("60", "25") == D(60) + 100
    # field threshold alone (service candidate none): flat += 0.5
    assert price("5", "10") == D("1.5") * 5
    # a non-numeric field value never matches a field threshold
    assert price("5", "big") == D(5)
    assert price("5", "NaN") == D(5)


def test_field_lookup_groupby_wins_and_missing_field(tmp_path):
    rules = load_rules(write(tmp_path, """
        hashmap:
          services:
            instance:
              fields:
                flavor_name:
                  mappings:
                    - {value: a, cost: "1"}
                    - {value: b, cost: "2", group: other}
    """))
    both = point(groupby={"flavor_name": "a"}, metadata={"flavor_name": "b"})
    assert price_point(rules, "instance", None, T0, both) == D(1)
    assert price_point(rules, "instance", None, T0, point(price="7")) == D(7)


def test_non_string_field_values_compare_as_str(tmp_path):
    rules = load_rules(write(tmp_path, """
        hashmap:
          services:
            instance:
              fields:
                vcpus:
                  mappings:
                    - {value: "2", cost: "1"}
                  thresholds:
                    - {level: "4", cost: "10", group: big}
    """))
    for value, expected in ((2, 1), ("2", 1), (2.0, 0), (True, 0), (8, 0),
                            (D("8"), 0), (None, 0), (["2"], 0)):
        pt = point(metadata={"vcpus": value})
        got = price_point(rules, "instance", None, T0, pt)
        # the "big" group only has a flat threshold on a field: flat 0 + 10
        big = 10 if value in (8, D("8")) else 0
        assert got == D(expected + big), value


# --------------------------------------------------------------------------
# process()
# --------------------------------------------------------------------------

def test_process_frame_with_several_types(tmp_path):
    path = write(tmp_path, """
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "0.01"}
            volume.size:
              fields:
                volume_type:
                  mappings:
                    - {value: ssd, cost: "0.002"}
            ip.floating:
              mappings:
                - {cost: "0.005", start: "2027-01-01T00:00:00Z"}
    """)
    proc = HashMapProcessor(make_conf(path))
    cpu = [point("55.5", price="1.25"), point("10", price="0")]
    frame = DataFrame("p1", T0, T0 + HOUR, {
        "instance": [point("1"), point("2", price="0.5")],
        "volume.size": [point("10", metadata={"volume_type": "ssd"}),
                        point("10", price="3", metadata={"volume_type": "hdd"})],
        "ip.floating": [point("1", price="9")],
        "cpu.util": cpu,
        "empty": [],
    })
    out = proc.process(frame)
    assert [p.price for p in out.points("instance")] == [D("0.01"), D("0.52")]
    assert [p.price for p in out.points("volume.size")] == [D("0.02"), D("3")]
    assert [p.price for p in out.points("ip.floating")] == [D("9")]  # not yet active
    assert out.points("cpu.util") is cpu  # untouched
    assert out.points("empty") == []
    # everything but the price is kept
    assert out.points("volume.size")[0].metadata == {"volume_type": "ssd"}
    assert out.points("instance")[1].qty == D("2")
    assert isinstance(out.points("instance")[0], DataPoint)


def test_process_naive_begin_is_utc(tmp_path):
    path = write(tmp_path, WINDOWS)
    proc = HashMapProcessor(make_conf(path))
    naive = datetime.datetime(2026, 1, 1, 10)
    assert rate_one(proc, "instance", point(), begin=naive) == D(2)


def test_sample_rules_file_is_valid():
    rules = load_rules(SAMPLE_RULES)
    assert {"instance", "volume.size", "image.size", "ip.floating"} <= set(rules.services)
    assert "cpu.util" not in rules.services
    tiny = point("1", groupby={"id": "i1", "user_id": "u", "project_id": "p"},
                 metadata={"flavor_name": "m1.tiny"})
    large = tiny._replace(metadata={"flavor_name": "m1.large"})
    assert D(0) < price_point(rules, "instance", "p", T0, tiny) \
        < price_point(rules, "instance", "p", T0, large)
    ssd = point("100", metadata={"volume_type": "ssd"})
    hdd = point("100", metadata={"volume_type": "hdd"})
    assert price_point(rules, "volume.size", "p", T0, ssd) \
        > price_point(rules, "volume.size", "p", T0, hdd) > 0
