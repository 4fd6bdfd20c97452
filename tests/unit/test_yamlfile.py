"""The operators' YAML files: duplicate keys, alias bombs, non-UTF-8 text and
out-of-range numbers are refused with one line naming the file (issue 15
items 4 and 11, the unclear-errors list; issue 16 item 1 for metrics.yml)."""

from __future__ import annotations

import decimal

import pytest

from cloudkitty_proc import metrics_conf, yamlfile
from cloudkitty_proc.exceptions import ConfigError

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
metrics: {x: {unit: u, groupby: *i}}
"""


def write(tmp_path, text: str | bytes, name="metrics.yml"):
    path = tmp_path / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


def test_duplicate_key_is_refused_with_both_lines(tmp_path):
    path = write(tmp_path, "metrics:\n  cpu:\n    unit: instance\n  ram:\n    unit: MiB\n"
                           "  cpu:\n    unit: vcpu\n")
    with pytest.raises(ConfigError) as err:
        metrics_conf.load_metrics_conf(path)
    assert str(err.value) == (f"{path}: invalid YAML: line 6, column 3: key 'cpu' written "
                              "twice (first on line 2)")


def test_same_key_in_different_mappings_is_fine(tmp_path):
    path = write(tmp_path, "metrics:\n  cpu: {unit: a, extra_args: {x: 1}}\n"
                           "  ram: {unit: b, extra_args: {x: 2}}\n")
    assert [m.name for m in metrics_conf.load_metrics_conf(path).metrics] == ["cpu", "ram"]


def test_merge_keys_still_work(tmp_path):
    path = write(tmp_path, "base: &base {unit: u}\n")
    assert yamlfile.load(path) == {"base": {"unit": "u"}}
    assert yamlfile.loads("x: &x {a: 1}\ny:\n  <<: *x\n  b: 2\n", "f") == {
        "x": {"a": 1}, "y": {"a": 1, "b": 2}}
    # a key written next to a merge key overrides the merged one: no duplicate
    assert yamlfile.loads("x: &x {a: 1, b: 1}\ny: {<<: *x, a: 2}\n", "f") == {
        "x": {"a": 1, "b": 1}, "y": {"a": 2, "b": 1}}
    with pytest.raises(ConfigError, match="key 'a' written twice"):
        yamlfile.loads("x: &x {a: 1}\ny: {<<: *x, a: 2, a: 3}\n", "f")


@pytest.mark.timeout(60)
def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = write(tmp_path, BOMB)
    with pytest.raises(ConfigError) as err:
        metrics_conf.load_metrics_conf(path)
    message = str(err.value)
    assert message.startswith(f"{path}: YAML aliases expand the document to ")
    assert "(at most 100000)" in message and len(message) < 300


def test_aliases_within_the_bound_are_kept(tmp_path):
    text = "a: &a [1, 2, 3]\nb: [*a, *a]\n"
    assert yamlfile.loads(text, "f") == {"a": [1, 2, 3], "b": [[1, 2, 3], [1, 2, 3]]}


def test_not_utf8_names_the_file_and_the_offset(tmp_path):
    path = write(tmp_path, b"metrics:\n  cpu:\n    unit: \xe9t\xe9\n")
    with pytest.raises(ConfigError) as err:
        metrics_conf.load_metrics_conf(path)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset 26)"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="metrics file not found .set .collect. metrics_conf"):
        metrics_conf.load_metrics_conf(str(tmp_path / "nope.yml"))
    with pytest.raises(ConfigError, match="metrics file is a directory"):
        metrics_conf.load_metrics_conf(str(tmp_path))


def test_excerpt_is_bounded():
    assert yamlfile.excerpt("short") == "'short'"
    long = yamlfile.excerpt("x" * 1_000_000)
    assert len(long) < 120 and long.endswith("(1000002 characters)")
    assert yamlfile.excerpt(list(range(1000))) == "<list of 1000 items>"


@pytest.mark.parametrize("key,value,needle", [
    ("factor", ".inf", "expected a finite number"),
    ("factor", ".nan", "expected a finite number"),
    ("offset", "-.inf", "expected a finite number"),
    ("factor", "1e400", "out of range"),
    ("factor", "1e16", "out of range"),
    ("offset", "10000000000000001", "out of range"),
    ("factor", "1/10000000000000001", "out of range"),
    ("factor", "1/0", "expected an int, a float or a fraction"),
    ("factor", "'" + "9" * 100_000 + "'", "(100002 characters)"),
])
def test_factor_and_offset_are_bounded(tmp_path, key, value, needle):
    path = write(tmp_path, f"metrics:\n  cpu:\n    unit: u\n    {key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        metrics_conf.load_metrics_conf(path)
    message = str(err.value)
    assert message.startswith(f"{path}: metric 'cpu'") and f"key '{key}'" in message
    assert needle in message and len(message) < 400


def test_mutate_map_values_are_numbers_at_load(tmp_path):
    path = write(tmp_path, "metrics:\n  cpu:\n    unit: u\n    mutate: MAP\n"
                           "    mutate_map: {1: '1/2', 2: 3}\n")
    [m] = metrics_conf.load_metrics_conf(path).metrics
    assert m.convert("1") == decimal.Decimal("0.5")
    assert m.convert("2") == 3
    bad = write(tmp_path, "metrics:\n  cpu:\n    unit: u\n    mutate: MAP\n"
                          "    mutate_map: {1: .nan}\n", name="bad.yml")
    with pytest.raises(ConfigError, match=r"key 'mutate_map.1': expected a finite number"):
        metrics_conf.load_metrics_conf(bad)


@pytest.mark.parametrize("raw", ["1e999999", "-1e37", "1e-999999", "2e-37"])
def test_quantities_out_of_range_are_refused_like_non_numbers(raw):
    [m] = metrics_conf.parse_metrics({"metrics": {"cpu": {"unit": "u"}}}).metrics
    with pytest.raises(ValueError, match="out of the accepted range of quantities"):
        m.convert(raw)
    assert m.convert("1e36") == decimal.Decimal("1e36")
    assert m.convert("0") == 0
