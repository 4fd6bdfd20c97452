"""The hashmap processor prices every compatibility vector like CloudKitty.

``tests/fixtures/compat/hashmap-vectors.json`` (a copy of shared/compat/) holds 1,519
datapoints priced by CloudKitty 25.0.0's own HashMap module. Each ruleset is
written to a YAML file and loaded through the real loader; each case is
rated by ``HashMapProcessor.process`` on a one-point frame and by
``price_point``, and both must equal the expected price as Decimals.
"""

from __future__ import annotations

import datetime
import decimal
import json
import pathlib

import pytest
import yaml
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.rating.hashmap import HashMapProcessor, price_point

REPO = pathlib.Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "fixtures" / "compat" / "hashmap-vectors.json"
EXPECTED_CASES = 1519


def _load_vectors() -> dict:
    if not VECTORS.is_file():
        pytest.fail(f"compatibility vectors not found at {VECTORS}", pytrace=False)
    with VECTORS.open(encoding="utf-8") as fh:
        return json.load(fh)


def _processor(tmp_path: pathlib.Path, index: int, rules: dict) -> HashMapProcessor:
    path = tmp_path / f"rating-{index}.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf.set_override("rules_file", str(path), group="hashmap")
    return HashMapProcessor(conf)


def _utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).astimezone(datetime.timezone.utc)


def test_all_vectors_match_cloudkitty(tmp_path):
    data = _load_vectors()
    D = decimal.Decimal
    mismatches = []
    total = 0
    for rs_index, ruleset in enumerate(data["rulesets"]):
        proc = _processor(tmp_path, rs_index, ruleset["rules"])
        for case_index, case in enumerate(ruleset["cases"]):
            total += 1
            raw = case["point"]
            point = DataPoint(raw["unit"], D(raw["qty"]), D(raw["price"]),
                              dict(raw["groupby"]), dict(raw["metadata"]))
            begin = _utc(case["period_start"])
            frame = DataFrame(case["scope"], begin,
                              begin + datetime.timedelta(hours=1),
                              {case["service"]: [point]})
            rated = proc.process(frame).points(case["service"])
            got = rated[0].price
            quoted = price_point(proc.rules, case["service"], case["scope"],
                                 case["period_start"], point)
            expected = D(case["expected_price"])
            if got != expected or quoted != expected or len(rated) != 1:
                mismatches.append(
                    f"ruleset {rs_index} case {case_index}: service "
                    f"{case['service']!r} scope {case['scope']!r} period "
                    f"{case['period_start']} point {raw}: expected {expected}, "
                    f"process() gave {got}, price_point() gave {quoted}; "
                    f"rules {json.dumps(ruleset['rules'])}")
    assert total == EXPECTED_CASES, f"{VECTORS}: {total} cases, expected {EXPECTED_CASES}"
    assert not mismatches, (f"{len(mismatches)} of {total} cases differ from "
                            f"CloudKitty; first ones:\n" + "\n".join(mismatches[:5]))
