"""The hashmap rules file: what is refused at load with the file and the key
(issue 15 items 4 and 11, the unclear-errors list; issue 16 item 1)."""

from __future__ import annotations

import decimal

import pytest

from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.rating.hashmap import load_rules
from tests.unit.test_yamlfile import BOMB


def rules(cost="1", level="10", extra=""):
    return (f"hashmap:\n  services:\n    instance:\n      mappings:\n"
            f"        - {{cost: {cost}}}\n      thresholds:\n"
            f"        - {{level: {level}, cost: 1}}\n{extra}")


def load_error(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "rating.yml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert len(message) < 500, len(message)
    return message


@pytest.mark.parametrize("cost,needle", [
    ('"1e999999"', "'cost' '1e999999' is out of range"),
    ('"1e500000"', "'cost' '1e500000' is out of range"),
    ("1e16", "'cost' '1e16' is out of range"),
    ('"-1e-29"', "is out of range"),
    ('"1.' + "1" * 40 + '"', "more than 40 significant digits"),
    (".inf", "'cost' is not a decimal: inf"),
    (".nan", "'cost' is not a decimal: nan"),
    ('"' + "9" * 100_000 + '"', "(100002 characters)"),
])
def test_costs_are_bounded(tmp_path, cost, needle):
    message = load_error(tmp_path, rules(cost=cost))
    assert "service 'instance', mappings[0]" in message and needle in message


def test_levels_are_bounded(tmp_path):
    message = load_error(tmp_path, rules(level='"1e37"'))
    assert "thresholds[0]: 'level' '1e37' is out of range" in message


def test_bounds_keep_every_cost_cloudkitty_can_hold(tmp_path):
    path = tmp_path / "rating.yml"
    path.write_text(rules(cost='"0.0000000000000000000000000001"', level='"1e36"'))
    ruleset = load_rules(path)
    assert ruleset is not None
    assert decimal.Decimal("0.0000000000000000000000000001") > 0


def test_duplicate_service_is_refused_with_its_lines(tmp_path):
    text = ("hashmap:\n  services:\n    instance:\n      mappings: [{cost: 1}]\n"
            "    instance:\n      mappings: [{cost: 2}]\n")
    message = load_error(tmp_path, text)
    assert message.endswith("invalid YAML: line 5, column 5: key 'instance' written twice "
                            "(first on line 3)")


def test_duplicate_field_key_is_refused(tmp_path):
    message = load_error(tmp_path, rules(cost="{1: 2}").replace("{cost: {1: 2}}",
                                                                "{cost: 1, cost: 2}"))
    assert "key 'cost' written twice" in message


@pytest.mark.timeout(60)
def test_alias_bomb_is_refused(tmp_path):
    message = load_error(tmp_path, BOMB)
    assert "YAML aliases expand the document to" in message


def test_not_utf8_names_the_rules_file(tmp_path):
    message = load_error(tmp_path, rules().encode() + b"# caf\xe9\n")
    assert "not UTF-8 text (byte 0xe9 at offset" in message
