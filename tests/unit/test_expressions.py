"""The safe expression language of skip_datapoints_expression, and the skip
applied at collection (global option and per-metric override)."""

from __future__ import annotations

import datetime
import decimal
from decimal import Decimal as D

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.collectors.base import BaseCollector
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.expressions import (
    ExpressionError,
    ExpressionEvalError,
    compile_expression,
    parse_expression,
)
from cloudkitty_proc.metrics_conf import parse_metrics
from cloudkitty_proc.skipping import Skipper

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + datetime.timedelta(hours=1)


def env(qty="0.5", price="0", unit="instance", groupby=None, metadata=None):
    return {"qty": D(qty), "price": D(price), "unit": unit,
            "groupby": {"id": "vm1", "project_id": "p1"} if groupby is None else groupby,
            "metadata": {"flavor_name": "m1.tiny"} if metadata is None else metadata}


# --------------------------------------------------------------------------
# Refused at compile time
# --------------------------------------------------------------------------

@pytest.mark.parametrize("source,problem", [
    ("__import__('os')", "function calls are not allowed"),
    ("__import__('os').system('true')", "not allowed"),
    ("().__class__", "attribute access is not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
    ("groupby.get('x')", "not allowed"),
    ("unit.upper() == 'X'", "not allowed"),
    ("len(unit) > 2", "function calls are not allowed"),
    ("open('/etc/passwd')", "function calls are not allowed"),
    ("__builtins__", "dunder name '__builtins__' is not allowed"),
    ("__name__ == 'x'", "dunder name"),
    ("os", "unknown name 'os'"),
    ("lambda: 1", "lambdas are not allowed"),
    ("[g for g in groupby]", "comprehensions are not allowed"),
    ("{k: 1 for k in groupby}", "comprehensions are not allowed"),
    ("any(x for x in groupby)", "not allowed"),
    ("f'{qty}' == '1'", "f-strings are not allowed"),
    ("qty ** 99999999", "operator Pow is not allowed"),
    ("unit[0] == 'i'", "only groupby[...] and metadata[...]"),
    ("groupby['a':'b']", "slices are not allowed"),
    ("qty if qty else price", "conditional expressions are not allowed"),
    ("(x := 1)", "not allowed"),
    ("qty == 0; qty == 1", "single expression"),
    ("import os", "must be an expression"),
    ("qty ==", "syntax error"),
    ("", "empty expression"),
    ("   ", "empty expression"),
    ("-" * 80 + "qty", "nested more than"),
    ("qty == 1 or " * 200 + "qty == 0", "longer than"),
])
def test_refused(source, problem):
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert problem in str(info.value)


def test_refused_is_a_config_error_naming_where():
    with pytest.raises(ConfigError) as info:
        compile_expression("__import__('os')", where="metrics.yml: metric 'cpu'")
    msg = str(info.value)
    assert msg.startswith("metrics.yml: metric 'cpu': invalid expression")
    assert "__import__" in msg and "function calls are not allowed" in msg


def test_nothing_runs_while_refusing(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ExpressionError):
        parse_expression(f"__import__('os').system('touch {marker}')")
    with pytest.raises(ExpressionError):
        parse_expression(f"open('{marker}', 'w')")
    assert not marker.exists()


# --------------------------------------------------------------------------
# Accepted and evaluated
# --------------------------------------------------------------------------

@pytest.mark.parametrize("source,expected", [
    ("qty == 0", False),
    ("qty == 0.5", True),
    ("metadata['flavor_name'] == 'm1.tiny' and qty < 1", True),
    ("metadata['flavor_name'] == 'm1.tiny' and qty >= 1", False),
    ("'id' in groupby", True),
    ("'nope' in groupby", False),
    ("'nope' not in metadata", True),
    ("metadata['missing'] is None", True),
    ("groupby['id'] in ('vm1', 'vm2')", True),
    ("groupby['id'] in ['vm3']", False),
    ("unit in {'instance', 'volume'}", True),
    ("0 < qty < 1", True),
    ("0 < qty < 0.4", False),
    ("qty * 2 == 1", True),
    ("qty + 0.1 + 0.2 == 0.8", True),  # Decimal: no binary rounding
    ("qty / 3 > 0.16", True),
    ("qty % 0.5 == 0", True),
    ("-qty < 0", True),
    ("not qty", False),
    ("price == 0 or unit == 'x'", True),
    ("1_000 > qty", True),
    ("True", True),
    ("None", False),
])
def test_accepted(source, expected):
    assert parse_expression(source).evaluate(env()) is expected


def test_numbers_are_decimals_from_their_source_text():
    assert parse_expression("qty == 0.1").evaluate(env(qty="0.1"))
    assert parse_expression("qty == 1e3").evaluate(env(qty="1000"))


def test_call_interface_and_matches_point():
    expr = parse_expression("qty == 0 and groupby['id'] == 'a'")
    assert expr(qty=D(0), price=D(0), unit="u", groupby={"id": "a"}, metadata={})
    point = DataPoint("u", D(0), D(0), {"id": "b"}, {})
    assert not expr.matches(point)


@pytest.mark.parametrize("source", [
    "metadata['flavor_name'] < 1",       # str vs Decimal
    "metadata['missing'] > 2",           # None vs Decimal
    "qty + unit == 1",                   # arithmetic on a str
    "unit * 1000000 == ''",              # no string repetition
    "qty / 0 == 1",                      # Decimal division by zero
    "-unit == 1",
])
def test_type_errors_at_run_time_raise_eval_error(source):
    with pytest.raises(ExpressionEvalError):
        parse_expression(source).evaluate(env())


# --------------------------------------------------------------------------
# Options and metrics.yml
# --------------------------------------------------------------------------

def make_conf(expr: str | None = None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf([])
    if expr is not None:
        conf.set_override("skip_datapoints_expression", expr, group="orchestrator")
    return conf


@pytest.mark.parametrize("section", ["orchestrator", "collect"])
def test_global_option_refuses_unsafe_expression(tmp_path, section):
    """CloudKitty's [orchestrator] location; [collect] is a deprecated alias."""
    path = tmp_path / "ckp.conf"
    path.write_text(f"[{section}]\nskip_datapoints_expression = ().__class__\n")
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf(["--config-file", str(path)])
    with pytest.raises(ValueError) as info:
        conf.orchestrator.skip_datapoints_expression  # noqa: B018 - read validates
    assert "attribute access is not allowed" in str(info.value)


@pytest.mark.parametrize("cloudkitty,ours", [
    ('datapoint.get("vol", {}).get("qty", 0) == 0', "qty == 0"),
    ("datapoint['vol']['qty'] < 1 and datapoint['metadata']['flavor_name'] == 'm1.tiny'",
     "qty < 1 and metadata['flavor_name'] == 'm1.tiny'"),
    ('datapoint.get("rating", {}).get("price", 0) == 0', "price == 0"),
    ('datapoint.get("groupby", {}).get("project_id") in ("a", "b")',
     "groupby['project_id'] in (\"a\", \"b\")"),
])
def test_cloudkitty_expressions_are_refused_with_their_equivalent(cloudkitty, ours):
    with pytest.raises(ExpressionError) as info:
        parse_expression(cloudkitty)
    assert str(info.value).endswith(f"the same here: {ours}")
    parse_expression(ours)  # the suggestion is valid here


def test_cloudkitty_expression_without_an_equivalent_names_our_names():
    with pytest.raises(ExpressionError, match="use the names qty, price, unit"):
        parse_expression("len(datapoint['groupby']) > 2")


def test_cloudkitty_default_false_keeps_everything():
    assert parse_expression("False").matches(
        DataPoint("u", decimal.Decimal(0), decimal.Decimal(0), {}, {})) is False


def test_metric_key_refuses_unsafe_expression():
    with pytest.raises(ConfigError) as info:
        parse_metrics({"metrics": {"cpu": {
            "unit": "instance",
            "skip_datapoints_expression": "__import__('os')"}}},
            path="/etc/m.yml")
    msg = str(info.value)
    assert msg.startswith("/etc/m.yml: metric 'cpu'")
    assert "key 'skip_datapoints_expression'" in msg
    assert "function calls are not allowed" in msg


SERIES = [
    ({"id": "a", "flavor_name": "m1.tiny"}, "0"),
    ({"id": "b", "flavor_name": "m1.tiny"}, "2"),
    ({"id": "c", "flavor_name": "m1.large"}, "0"),
    ({"id": "d", "flavor_name": "m1.large"}, "3"),
]


def _metrics(**extra):
    body = {"unit": "instance", "groupby": ["id"], "metadata": ["flavor_name"], **extra}
    return parse_metrics({"metrics": {"cpu": body}})


def _rated_frame(prices=("0", "1", "0", "5")):
    """SERIES as the rating chain leaves them (each with a price)."""
    frame = DataFrame("p1", T0, T1)
    frame.add_points("cpu", [
        DataPoint("instance", decimal.Decimal(raw), decimal.Decimal(price),
                  {"id": labels["id"]}, {"flavor_name": labels["flavor_name"]})
        for (labels, raw), price in zip(SERIES, prices)])
    return frame


def _ids(frame):
    return [p.groupby["id"] for p in frame.points("cpu")]


def test_global_expression_drops_rated_datapoints_before_storage():
    assert _ids(Skipper(make_conf("qty == 0"), _metrics()).apply(_rated_frame())) == ["b", "d"]


def test_expressions_see_the_rated_price():
    """Applied after rating, as CloudKitty does: the price is known."""
    skipper = Skipper(make_conf("price == 0"), _metrics())
    assert _ids(skipper.apply(_rated_frame(prices=("0", "0", "2", "5")))) == ["c", "d"]


def test_metric_expression_overrides_global_one():
    metrics = _metrics(skip_datapoints_expression="metadata['flavor_name'] == 'm1.tiny'")
    assert _ids(Skipper(make_conf("qty == 0"), metrics).apply(_rated_frame())) == ["c", "d"]


def test_blank_metric_expression_turns_the_global_one_off():
    metrics = _metrics(skip_datapoints_expression="")
    assert _ids(Skipper(make_conf("qty == 0"), metrics).apply(_rated_frame())) == [
        "a", "b", "c", "d"]


def test_no_expression_keeps_everything():
    assert len(Skipper(make_conf(), _metrics()).apply(_rated_frame())) == 4


def test_failing_expression_keeps_the_datapoint_and_warns_once(caplog):
    metrics = _metrics(skip_datapoints_expression="metadata['flavor_name'] > 1")
    skipper = Skipper(make_conf(), metrics)
    with caplog.at_level("WARNING"):
        frame = skipper.apply(_rated_frame())
        skipper.apply(_rated_frame())
    assert len(frame) == 4
    warnings = [r for r in caplog.records if "skip_datapoints_expression" in r.getMessage()]
    assert len(warnings) == 1


def test_the_collector_no_longer_skips():
    """Skipping moved after rating: collection keeps every datapoint."""
    class ListCollector(BaseCollector):
        def fetch(self, metric, scope_id, begin, end):
            return list(SERIES)

    metrics = _metrics(skip_datapoints_expression="qty == 0")
    coll = ListCollector(make_conf("qty == 0"), metrics)
    assert [p.groupby["id"] for p in coll.retrieve(metrics.metrics[0], "p1", T0, T1)] == [
        "a", "b", "c", "d"]
