"""The ``elasticsearch`` and ``opensearch`` storages: the contract suite
(tests/storage_contract.py) on SQLite and the fake server of
tests/fakes/elasticsearch.py, and what is particular to them: documents in
CloudKitty's layout, deterministic ids, scoped deletes, refreshes, errors."""

from __future__ import annotations

import datetime
import decimal
import json

import pytest

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import ConfigError, SchemaError, StorageError
from cloudkitty_proc import utils
from cloudkitty_proc.storage import external, models, search
from cloudkitty_proc.storage.elasticsearch import ElasticsearchPointStore, ElasticsearchStorage
from cloudkitty_proc.storage.opensearch import OpenSearchPointStore, OpenSearchStorage
from cloudkitty_proc.storage.search_mapping import MAPPING, MAPPING_WITH_KEYWORDS
from tests.fakes.elasticsearch import FakeSearch
from tests.storage_contract import StorageContract, at, fail_point_writes

D = decimal.Decimal
FLAVOURS = {
    "elasticsearch": (ElasticsearchPointStore, ElasticsearchStorage),
    "opensearch": (OpenSearchPointStore, OpenSearchStorage),
}


@pytest.fixture
def fake():
    with FakeSearch() as server:
        yield server


def contract_fixture(flavour: str):
    store_class, storage_class = FLAVOURS[flavour]

    @pytest.fixture
    def make_storage(self, tmp_path, fake):
        fake.record = False   # the streaming case measures the process's memory
        made = []
        url = f"sqlite:///{tmp_path}/ckp.sqlite"

        def make(upgrade: bool = True):
            points = store_class(None, "project_id", host=fake.url)
            storage = storage_class(url=url, points=points)
            made.append(storage)
            if upgrade:
                storage.upgrade()
            return storage

        yield make
        for storage in made:
            storage.close()

    return make_storage


class _SearchContract(StorageContract):
    exact_numbers = False

    def fail_storing(self, monkeypatch, storage, scope_id) -> None:
        fail_point_writes(monkeypatch, storage, scope_id)

    def small_fetch_batches(self, monkeypatch) -> None:
        monkeypatch.setattr(external, "READ_BATCH", 5)
        monkeypatch.setattr(search, "SEARCH_PAGE", 3)

    def move_frontier(self, storage, scope_id, last_processed) -> None:
        with storage.engine.begin() as connection:
            connection.execute(models.scope_state.update()
                               .where(models.scope_state.c.scope_id == scope_id)
                               .values(last_processed=utils.to_naive_utc(last_processed)))


class TestElasticsearchStorageContract(_SearchContract):
    make_storage = contract_fixture("elasticsearch")


class TestOpenSearchStorageContract(_SearchContract):
    make_storage = contract_fixture("opensearch")


# -- what is particular to these stores -------------------------------------

@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request):
    return request.param


@pytest.fixture
def store(fake, flavour):
    points = FLAVOURS[flavour][0](None, "project_id", host=fake.url, index_name="ck")
    points.init()
    yield points
    points.close()


def frame(scope: str, n: int, prices=("1",), groupby=None) -> DataFrame:
    f = DataFrame(scope, at(n), at(n + 1))
    f.add_points("instance", [
        DataPoint("instance", D(1), D(price), dict(groupby or {"id": f"vm-{i}"}),
                  {"flavor": "m1"}) for i, price in enumerate(prices)])
    return f


def test_documents_are_cloudkittys_layout(fake, store, flavour):
    f = DataFrame("Proj-A", at(0), at(1))
    f.add_points("volume", [DataPoint("GiB", D("2.5"), D("0.1"), {"id": "v1"},
                                      {"size": 3, "name": "é"})])
    store.write(f)
    [bulk] = fake.of("POST", "/ck/_bulk")
    assert bulk["content_type"] == "application/x-ndjson"
    action, doc = bulk["body"]
    expected = {"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T01:00:00+00:00",
                "type": "volume", "unit": "GiB", "qty": 2.5, "price": 0.1,
                "groupby": {"id": "v1", "project_id": "Proj-A"},
                "metadata": {"size": 3, "name": "é"}}
    if flavour == "elasticsearch":
        expected["description"] = None
    assert doc == expected
    assert list(doc) == [k for k in ("start", "end", "type", "unit", "description", "qty",
                                     "price", "groupby", "metadata") if k in expected]
    assert action == {"index": {"_id": search.doc_id(
        "Proj-A", at(0), "volume", {"id": "v1", "project_id": "Proj-A"})}}
    # the index was created with the mapping, nothing else
    [create] = fake.of("PUT", "/ck")
    assert create["body"] == {"mappings": MAPPING if flavour == "elasticsearch"
                              else MAPPING_WITH_KEYWORDS}


def test_rewrite_replaces_and_ids_are_deterministic(fake, store):
    store.write(frame("p1", 0, prices=("1", "2")))
    ids = set(fake.docs("ck"))
    store.write(frame("p1", 0, prices=("3", "4")))   # same scope, period, groupby
    assert set(fake.docs("ck")) == ids and len(ids) == 2
    assert sorted(r.price for r in store.read("p1", at(0), at(1))) == [D(3), D(4)]
    # the same groupby twice in one frame: two documents, neither overwritten
    store.write(frame("p1", 1, prices=("5", "6"), groupby={"id": "same"}))
    assert sorted(r.price for r in store.read("p1", at(1), at(2))) == [D(5), D(6)]
    store.write(frame("p1", 1, prices=("5", "6"), groupby={"id": "same"}))
    assert len(fake.docs("ck")) == 4
    # another scope, period or type: other ids
    store.write(frame("p2", 0, prices=("1", "2")))
    assert len(fake.docs("ck")) == 6


def test_scoped_delete_leaves_other_scopes_and_periods(fake, store, flavour):
    for scope in ("p1", "p2"):
        for n in range(3):
            store.write(frame(scope, n, prices=("1", "2")))
    store.delete("p1", at(1), None)
    assert sorted({r.begin for r in store.read("p1", at(0), at(9))}) == [at(0)]
    assert len(store.read("p2", at(0), at(9))) == 6
    store.delete("p2", at(0), at(1))
    assert sorted({r.begin for r in store.read("p2", at(0), at(9))}) == [at(1), at(2)]
    [first, _] = fake.of("POST", "/ck/_delete_by_query")
    field = "groupby.project_id" + (".keyword" if flavour == "opensearch" else "")
    assert first["body"] == {"query": {"bool": {"filter": [
        {"term": {field: "p1"}}, {"range": {"start": {"gte": "2026-01-01T01:00:00+00:00"}}}]}}}


def test_reads_and_deletes_refresh_first_writes_do_not(fake, store):
    store.write(frame("p1", 0))
    assert fake.of("POST", "/ck/_refresh") == []
    # the fake shows only refreshed documents: the read sees the write
    assert len(store.read("p1", at(0), at(1))) == 1
    paths = [r["path"] for r in fake.requests if r["method"] == "POST"]
    assert paths[-3:] == ["/ck/_bulk", "/ck/_refresh", "/ck/_search"]
    store.write(frame("p1", 1))
    store.delete("p1", at(0), None)
    assert fake.docs("ck") == {}


def test_reads_page_through_a_scroll_and_clear_it(fake, store, monkeypatch):
    monkeypatch.setattr(search, "SEARCH_PAGE", 4)
    store.write(frame("p1", 0, prices=[str(i) for i in range(10)]))
    store.write(frame("p1", 1, prices=("1",)))
    rows = store.read("p1", at(0), at(1))
    assert sorted(r.price for r in rows) == [D(i) for i in range(10)]
    [searched] = fake.of("POST", "/ck/_search")
    assert searched["params"] == {"scroll": "30s"}
    assert searched["body"]["size"] == 4
    assert searched["body"]["sort"] == [{"start": {"order": "asc"}}, "_doc"]
    assert len(fake.of("POST", "/_search/scroll")) == 2   # 4 + 4 + 2
    [cleared] = fake.of("DELETE", "/_search/scroll")
    assert cleared["body"] == {"scroll_id": ["scroll-1"]}
    assert fake.scrolls == {}


def test_bulk_item_error_raises_naming_the_document(fake, store, flavour):
    store.write(frame("p1", 0))   # metadata.flavor: mapped as a keyword
    bad = frame("p1", 1)
    bad.add_points("volume", [DataPoint("GiB", D(1), D(1), {"id": "v"}, {"flavor": 7})])
    bad.add_points("zz", [DataPoint("u", D(1), D(1), {"id": "z"}, {"flavor": {"a": 1}})])
    with pytest.raises(StorageError) as info:
        store.write(bad)
    message = str(info.value)
    name = "Elasticsearch" if flavour == "elasticsearch" else "OpenSearch"
    # 7 is taken (as "7"), the object is refused by the mapping
    assert message.startswith(f"{name} at {fake.url}: writing 3 points of scope p1: 1 "
                              "refused, the first: document ")
    assert "(type zz, period 2026-01-01T01:00:00+00:00): HTTP 400 " \
           "mapper_parsing_exception: failed to parse field [metadata.flavor]" in message
    assert "\n" not in message
    fake.refuse = lambda doc: (429, {"type": "es_rejected_execution_exception",
                                     "reason": "queue full"})
    with pytest.raises(StorageError, match=r"2 refused, the first: .*HTTP 429 "
                                           r"es_rejected_execution_exception: queue full"):
        store.write(frame("p1", 3, prices=("1", "2")))


def test_write_many_sends_many_scopes_in_one_bulk(fake, store, flavour):
    """A batched commit's write: one _bulk for the documents of every
    frame, write_batch_size documents a request whatever their scope; a
    refused document names its scope."""
    store.write_many([frame(s, 0, prices=("1", "2")) for s in ("p1", "p2", "p3")])
    [bulk] = fake.of("POST", "/ck/_bulk")
    ids = [line["index"]["_id"] for line in bulk["body"][::2]]
    assert len(ids) == len(set(ids)) == 6
    assert {r.begin for s in ("p1", "p2", "p3") for r in store.read(s, at(0), at(1))} == {
        at(0)}
    store.batch_size = 4
    store.write_many([frame(s, 1, prices=("1", "2", "3")) for s in ("q1", "q2")])
    assert [len(b["body"]) // 2 for b in fake.of("POST", "/ck/_bulk")[1:]] == [4, 2]
    fake.refuse = lambda doc: (None if doc["groupby"]["project_id"] != "r2" else (
        429, {"type": "es_rejected_execution_exception", "reason": "queue full"}))
    with pytest.raises(StorageError) as info:
        store.write_many([frame(s, 2) for s in ("r1", "r2", "r3")])
    name = "Elasticsearch" if flavour == "elasticsearch" else "OpenSearch"
    assert str(info.value).startswith(
        f"{name} at {fake.url}: writing 3 points of 3 scopes (r1, r2, r3): 1 refused, the "
        "first: document ")
    assert "(scope r2, type instance, period 2026-01-01T02:00:00+00:00): HTTP 429" in str(
        info.value)


def test_delete_from_deletes_many_scopes_in_one_request(fake, store, flavour):
    for scope in ("p1", "p2", "p3"):
        for n in range(3):
            store.write(frame(scope, n))
    store.delete_from(["p1", "p3"], at(1))
    [deleted] = fake.of("POST", "/ck/_delete_by_query")
    field = "groupby.project_id" + (".keyword" if flavour == "opensearch" else "")
    assert deleted["body"] == {"query": {"bool": {"filter": [
        {"terms": {field: ["p1", "p3"]}},
        {"range": {"start": {"gte": "2026-01-01T01:00:00+00:00"}}}]}}}
    assert {s: sorted({r.begin for r in store.read(s, at(0), at(9))})
            for s in ("p1", "p2", "p3")} == {
        "p1": [at(0)], "p2": [at(0), at(1), at(2)], "p3": [at(0)]}


def test_http_errors_and_unreachable_raise_storage_error(fake, store, free_port):
    fake.fault = lambda method, path: (503, {"error": {
        "type": "cluster_block_exception", "reason": "blocked by: [SERVICE_UNAVAILABLE]"}})
    with pytest.raises(StorageError, match=r"at http://127\.0\.0\.1:\d+: writing 1 points "
                                           r"of scope p1: HTTP 503 Service Unavailable: "
                                           r"cluster_block_exception: blocked by"):
        store.write(frame("p1", 0))
    with pytest.raises(StorageError, match="refreshing index ck: HTTP 503"):
        store.read("p1", at(0), at(1))
    fake.fault = lambda method, path: (500, b"<html>oops</html>")
    with pytest.raises(StorageError, match=r"deleting|refreshing.*HTTP 500 .*<html>oops"):
        store.delete("p1", at(0), None)
    dead = type(store)(None, "project_id", host=f"http://127.0.0.1:{free_port}",
                       index_name="ck", timeout=5)
    with pytest.raises(StorageError, match=rf"at http://127\.0\.0\.1:{free_port}: "
                                           r"checking index ck: .*connect"):
        dead.initialized()


def test_init_is_idempotent_and_checks_an_existing_index(fake, flavour, tmp_path):
    store_class, storage_class = FLAVOURS[flavour]
    points = store_class(None, "project_id", host=fake.url)
    assert not points.initialized()
    points.init()
    points.init()
    assert points.initialized()
    assert len(fake.of("PUT", "/cloudkitty")) == 1
    # an empty index made by hand, as CloudKitty's docs ask: ES puts the
    # mapping on it, OpenSearch leaves it
    fake.handle("PUT", "/empty", {}, "application/json", b'{"mappings": {}}')
    store_class(None, "project_id", host=fake.url, index_name="empty").init()
    assert len(fake.of("PUT", "/empty/_mapping")) == (flavour == "elasticsearch")
    # an index holding documents under the default dynamic mapping
    # (CloudKitty's OpenSearch ones): groupby strings are text with a
    # .keyword sub-field: fine for OpenSearch's lookups, refused for ES
    fake.handle("PUT", "/plain", {}, "application/json", b'{"mappings": {}}')
    doc = {"start": "2026-01-01T00:00:00+00:00", "groupby": {"project_id": "p1"}}
    fake.handle("POST", "/plain/_bulk", {}, "application/x-ndjson",
                f'{{"index":{{"_id":"a"}}}}\n{json.dumps(doc)}\n'.encode())
    assert fake.indices["plain"].field("groupby.project_id")["type"] == "text"
    plain = store_class(None, "project_id", host=fake.url, index_name="plain")
    if flavour == "opensearch":
        plain.init()
    else:
        with pytest.raises(StorageError, match=r"checking the mapping of index plain: index "
                                               r"plain: the scope is looked up as "
                                               r"groupby.project_id, but groupby.project_id is "
                                               r"mapped as \{'type': 'text'"):
            plain.init()
    # the SQL schema alone is not enough: check_schema names the missing index
    storage = storage_class(url=f"sqlite:///{tmp_path}/ckp.sqlite", points=store_class(
        None, "project_id", host=fake.url, index_name="missing"))
    external.SQLStorage.upgrade(storage)
    with pytest.raises(SchemaError, match="OpenSearch|Elasticsearch: the database or index "
                                          "does not exist: run `cloudkitty-proc-manage"):
        storage.check_schema()
    storage.upgrade()
    storage.check_schema()
    storage.close()


def test_opensearch_finds_scopes_under_cloudkittys_default_mapping(fake):
    """CloudKitty's OpenSearch indices have the default mapping, where
    groupby strings are analysed text: the .keyword lookups find
    "Proj-A" exactly, and do not mix it up with "proj"."""
    fake.handle("PUT", "/plain", {}, "application/json", b'{"mappings": {}}')
    points = OpenSearchPointStore(None, "project_id", host=fake.url, index_name="plain")
    points.init()
    for scope in ("Proj-A", "proj"):
        points.write(frame(scope, 0))
    assert [r.scope_id for r in points.read("Proj-A", at(0), at(1))] == ["Proj-A"]
    points.delete("proj", at(0), None)
    assert [d["groupby"]["project_id"] for d in fake.docs("plain").values()] == ["Proj-A"]


def test_options_are_checked(flavour):
    store_class = FLAVOURS[flavour][0]
    with pytest.raises(ConfigError, match=r"use_datastream = True: data streams are not"):
        store_class(None, "project_id", use_datastream=True)
    with pytest.raises(ConfigError, match=r"index_name 'Bad Name': not a valid"):
        store_class(None, "project_id", index_name="Bad Name")
    with pytest.raises(ConfigError, match=r"host 'localhost:9200': expected http"):
        store_class(None, "project_id", host="localhost:9200").initialized()
    store = store_class(None, "project_id", scroll_duration=0)
    assert store.scroll == "1s"
    assert (store.index, store.batch_size) == ("cloudkitty", 5000)


def test_write_batches_and_read_back_floats(fake, store):
    store.batch_size = 3
    store.write(frame("p1", 0, prices=[str(i) for i in range(7)]))
    assert [len(r["body"]) // 2 for r in fake.of("POST", "/ck/_bulk")] == [3, 3, 1]
    f = DataFrame("p1", at(1), at(2))
    f.add_points("x", [DataPoint("u", D("0.1") + D("0.2"), D("1E+400"), {}, {})])
    with pytest.raises(StorageError, match=r"scope p1, x point .*cannot be stored"):
        store.write(f)
    f = DataFrame("p1", at(1), at(2))
    f.add_points("x", [DataPoint("u", D("0.30000000000000004441"), D("12345.678"), {}, {})])
    store.write(f)
    [row] = store.read("p1", at(1), at(2))
    assert (row.qty, row.price) == (D("0.30000000000000004"), D("12345.678"))
    assert (row.begin, row.end) == (at(1), at(2))
    assert row.begin.tzinfo == datetime.timezone.utc
    assert json.dumps(row.groupby) == '{"project_id": "p1"}'
