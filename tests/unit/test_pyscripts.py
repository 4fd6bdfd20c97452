"""pyscripts rating processor: disabled by default, scripts in order,
reload keeping the old scripts on error."""

from __future__ import annotations

import datetime
import pathlib
import textwrap
from decimal import Decimal as D

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import plugins
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import ConfigError, RatingError
from cloudkitty_proc.rating.pyscripts import PyScriptsProcessor

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + datetime.timedelta(hours=1)

DISCOUNT = """\
import decimal

def process(frame):
    for usage_type, points in frame.items():
        frame.replace_points(usage_type, [
            p._replace(price=p.price * decimal.Decimal("0.9")) for p in points])
    return frame
"""

ADD_ONE = """\
import decimal

def process(frame):
    for usage_type, points in frame.items():
        frame.replace_points(usage_type, [
            p._replace(price=p.price + decimal.Decimal(1)) for p in points])
    return frame
"""


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make_conf(*, allow=True, scripts=None, scripts_dir=None,
              processors=("pyscripts",)) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf([])
    conf.set_override("allow_pyscripts", allow, group="rating")
    conf.set_override("processors", list(processors), group="rating")
    if scripts is not None:
        conf.set_override("scripts", [str(s) for s in scripts], group="pyscripts")
    if scripts_dir is not None:
        conf.set_override("scripts_dir", str(scripts_dir), group="pyscripts")
    return conf


def frame(*prices: str) -> DataFrame:
    f = DataFrame("p1", T0, T1)
    f.add_points("instance", [DataPoint("instance", D(1), D(p), {"id": str(i)}, {})
                              for i, p in enumerate(prices)])
    return f


def prices(f: DataFrame) -> list[D]:
    return [p.price for p in f.points("instance")]


def test_refused_unless_allowed(tmp_path):
    script = write(tmp_path / "discount.py", DISCOUNT)
    with pytest.raises(ConfigError) as info:
        PyScriptsProcessor(make_conf(allow=False, scripts=[script]))
    msg = str(info.value)
    assert "allow_pyscripts = true" in msg and "trusted" in msg


def test_refused_unless_allowed_through_the_rating_chain(tmp_path):
    script = write(tmp_path / "discount.py", DISCOUNT)
    with pytest.raises(ConfigError) as info:
        plugins.load_rating_chain(make_conf(allow=False, scripts=[script]))
    assert "allow_pyscripts" in str(info.value)


def test_default_is_disabled():
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf([])
    assert conf.rating.allow_pyscripts is False


def test_needs_scripts():
    with pytest.raises(ConfigError) as info:
        PyScriptsProcessor(make_conf())
    assert "scripts" in str(info.value)


def test_scripts_run_in_listed_order(tmp_path):
    a = write(tmp_path / "a.py", DISCOUNT)
    b = write(tmp_path / "b.py", ADD_ONE)
    # discount then +1: 10*0.9+1 = 10
    proc = PyScriptsProcessor(make_conf(scripts=[a, b]))
    assert prices(proc.process(frame("10", "20"))) == [D("10.0"), D("19.0")]
    # +1 then discount: (10+1)*0.9 = 9.9
    proc = PyScriptsProcessor(make_conf(scripts=[b, a]))
    assert prices(proc.process(frame("10", "20"))) == [D("9.9"), D("18.9")]


def test_scripts_dir_runs_py_files_by_name(tmp_path):
    write(tmp_path / "20_add.py", ADD_ONE)
    write(tmp_path / "10_discount.py", DISCOUNT)
    write(tmp_path / "notes.txt", "not a script")
    proc = PyScriptsProcessor(make_conf(scripts_dir=tmp_path))
    assert [pathlib.Path(s.path).name for s in proc.scripts] == ["10_discount.py", "20_add.py"]
    assert prices(proc.process(frame("10"))) == [D("10.0")]


def test_in_the_chain_after_hashmap(tmp_path):
    rules = write(tmp_path / "rating.yml", """\
        hashmap:
          services:
            instance:
              mappings:
                - {cost: "2"}
        """)
    script = write(tmp_path / "discount.py", DISCOUNT)
    conf = make_conf(scripts=[script], processors=("hashmap", "pyscripts"))
    conf.set_override("rules_file", str(rules), group="hashmap")
    f = frame("0")
    for proc in plugins.load_rating_chain(conf):
        f = proc.process(f)
    assert prices(f) == [D("1.8")]


@pytest.mark.parametrize("text,problem", [
    ("def process(frame):\n    return frame +\n", "syntax error"),
    ("x = 1\n", "defines no process(frame) function"),
    ("process = 3\n", "defines no process(frame) function"),
    ("raise RuntimeError('boom')\n", "failed while loading: RuntimeError: boom"),
])
def test_bad_script_is_refused_naming_it(tmp_path, text, problem):
    script = write(tmp_path / "bad.py", text)
    with pytest.raises(ConfigError) as info:
        PyScriptsProcessor(make_conf(scripts=[script]))
    msg = str(info.value)
    assert str(script) in msg and problem in msg


def test_missing_script_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        PyScriptsProcessor(make_conf(scripts=[tmp_path / "nope.py"]))
    assert "nope.py" in str(info.value) and "cannot read" in str(info.value)


def test_script_errors_and_bad_returns_are_rating_errors(tmp_path):
    boom = write(tmp_path / "boom.py", "def process(frame):\n    raise KeyError('x')\n")
    proc = PyScriptsProcessor(make_conf(scripts=[boom]))
    with pytest.raises(RatingError) as info:
        proc.process(frame("1"))
    assert "boom.py" in str(info.value) and "KeyError" in str(info.value)

    none = write(tmp_path / "none.py", "def process(frame):\n    pass\n")
    proc = PyScriptsProcessor(make_conf(scripts=[none]))
    with pytest.raises(RatingError) as info:
        proc.process(frame("1"))
    assert "returned NoneType" in str(info.value)


def test_reload_rereads_scripts(tmp_path):
    script = write(tmp_path / "s.py", DISCOUNT)
    proc = PyScriptsProcessor(make_conf(scripts=[script]))
    assert prices(proc.process(frame("10"))) == [D("9.0")]
    write(script, ADD_ONE)
    proc.reload()
    assert prices(proc.process(frame("10"))) == [D("11")]


def test_reload_keeps_old_scripts_on_error(tmp_path, caplog):
    a = write(tmp_path / "a.py", DISCOUNT)
    b = write(tmp_path / "b.py", ADD_ONE)
    proc = PyScriptsProcessor(make_conf(scripts=[a, b]))
    before = proc.scripts
    write(b, "def process(frame:\n")  # syntax error in the second script
    with caplog.at_level("ERROR"), pytest.raises(ConfigError):
        proc.reload()
    assert proc.scripts is before
    assert prices(proc.process(frame("10"))) == [D("10.0")]
    assert any("keeping the 2 scripts" in r.getMessage() for r in caplog.records)


def test_check_loads_the_scripts(tmp_path):
    script = write(tmp_path / "s.py", DISCOUNT)
    conf = make_conf(scripts=[script])
    proc = PyScriptsProcessor(conf)
    proc.check()
    write(script, "x = 1\n")
    with pytest.raises(ConfigError):
        proc.check()


@pytest.mark.parametrize("target", ["file", "directory"])
def test_scripts_writable_by_others_are_refused(tmp_path, target):
    """Anyone able to change a script, or drop one into scripts_dir, would
    run code as the daemon (issue 15 item 13); refused whatever the umask."""
    directory = tmp_path / "scripts"
    directory.mkdir(mode=0o755)
    script = write(directory / "discount.py", DISCOUNT)
    (script if target == "file" else directory).chmod(0o777 if target == "directory" else 0o666)
    for conf in (make_conf(scripts=[str(script)]), make_conf(scripts_dir=directory)):
        with pytest.raises(ConfigError) as err:
            PyScriptsProcessor(conf)
        where = str(script) if target == "file" else str(directory)
        assert f"{where}: writable by other users" in str(err.value)
        assert f"chmod o-w {where}" in str(err.value)
    (script if target == "file" else directory).chmod(0o644 if target == "file" else 0o755)
    assert prices(PyScriptsProcessor(make_conf(scripts=[str(script)])).process(frame("10"))) \
        == [D("9.0")]


# CloudKitty's documented pyscript (doc/source/user/rating/pyscripts.rst of
# CloudKitty 25.0.0), as an operator would carry it over.
CLOUDKITTY_DOC_SCRIPT = '''
import decimal


flavors = {
    'm1.micro': decimal.Decimal(0.65),
    'm1.nano': decimal.Decimal(0.35),
    'm1.large': decimal.Decimal(2.67)
}

image_mb_price = decimal.Decimal(0.002)
volume_gb_price = decimal.Decimal(0.35)


def get_instance_price(item):
    if not item['metadata']['flavor_name'] in flavors:
        return 0
    else:
        return (decimal.Decimal(item['vol']['qty'])
               * flavors[item['metadata']['flavor_name']])

def get_image_price(item):
    if not item['vol']['qty']:
        return 0
    else:
        return decimal.Decimal(item['vol']['qty']) * image_mb_price


def get_volume_price(item):
    if not item['vol']['qty']:
        return 0
    else:
        return decimal.Decimal(item['vol']['qty']) * volume_gb_price

services = {
    'instance': get_instance_price,
    'volume': get_volume_price,
    'image': get_image_price
}


def process(data):
    usage_data = data['usage']

    for service_name, service_data in usage_data.items():
        if service_name in services.keys():
            for item in service_data:
                item['rating'] = {'price': services[service_name](item)}
    return data


data = process(data)
'''


def _ck_frame() -> DataFrame:
    begin = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    f = DataFrame("p1", begin, begin + datetime.timedelta(hours=1))
    f.add_points("instance", [
        DataPoint("instance", D("1"), D("0"), {"id": "vm1"}, {"flavor_name": "m1.nano"}),
        DataPoint("instance", D("1"), D("0"), {"id": "vm2"}, {"flavor_name": "m1.huge"}),
    ])
    f.add_points("volume", [DataPoint("GiB", D("20"), D("0"), {"id": "v1"}, {})])
    f.add_points("cpu.util", [DataPoint("%", D("3.5"), D("7"), {"id": "vm1"}, {})])
    return f


def test_cloudkitty_scripts_run_with_the_cloudkitty_contract(tmp_path):
    script = write(tmp_path / "ck.py", CLOUDKITTY_DOC_SCRIPT)
    # our own contract refuses it at load (no global data): a clear error
    with pytest.raises(ConfigError, match=r"ck.py: failed while loading: NameError"):
        PyScriptsProcessor(make_conf(scripts=[script]))
    conf = make_conf(scripts=[script])
    conf.set_override("contract", "cloudkitty", group="pyscripts")
    out = PyScriptsProcessor(conf).process(_ck_frame())
    # prices as CloudKitty computes them: Decimal(float) products, through str()
    nano = D(str(D(1) * D(0.35)))
    assert [(p.groupby["id"], p.price) for p in out.points("instance")] == [
        ("vm1", nano), ("vm2", D(0))]
    assert [p.price for p in out.points("volume")] == [D(str(D(20) * D(0.35)))]
    assert [p.price for p in out.points("cpu.util")] == [D(7)]  # not in services: kept
    assert out.scope_id == "p1" and out.types() == ["cpu.util", "instance", "volume"]
    assert out.points("instance")[0].metadata == {"flavor_name": "m1.nano"}


def test_cloudkitty_script_leaving_bad_data_fails_the_period(tmp_path):
    script = write(tmp_path / "bad.py", "data['usage']['volume'][0]['vol'] = None\n")
    conf = make_conf(scripts=[script])
    conf.set_override("contract", "cloudkitty", group="pyscripts")
    with pytest.raises(RatingError) as err:
        PyScriptsProcessor(conf).process(_ck_frame())
    assert "bad.py" in str(err.value) and "usage['volume'][0]: not a CloudKitty datapoint" \
        in str(err.value)
