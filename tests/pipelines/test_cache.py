"""Cache keys (code version, parameters, input content) and the storage records live in."""

from pipelines.cache import read_record, stage_key, write_record
from pipelines.hashing import hash_files, hash_json
from pipelines.kinds import load_kind
from pipelines.stage import StageKind, StageRecord
from pipelines.storage import Storage, is_remote
from tests.s3server import s3_bucket


def _kind(version: str = "1") -> StageKind:
    return StageKind(name="k", params="x:y", run=lambda ctx: None, version=version)


def test_stage_key_follows_the_declared_version_not_the_source_text():
    """Only a bumped version changes a key; the library's source text (comments included) is no part of it."""
    key = stage_key(_kind(), {"steps": 10}, {"ingest": "abc"})
    assert stage_key(_kind("2"), {"steps": 10}, {"ingest": "abc"}) != key
    for kind in ("train", "evaluate", "sweep", "ingest", "register", "deploy"):
        assert not hasattr(load_kind(kind), "code"), kind
        assert isinstance(load_kind(kind).version, str) and load_kind(kind).version


def test_stage_key_changes_with_params_and_input_content_only():
    kind = _kind()
    key = stage_key(kind, {"steps": 10, "model": {"preset": "tiny"}}, {"ingest": "abc"})
    assert stage_key(kind, {"model": {"preset": "tiny"}, "steps": 10}, {"ingest": "abc"}) == key  # order-free
    assert stage_key(kind, {"steps": 11, "model": {"preset": "tiny"}}, {"ingest": "abc"}) != key
    assert stage_key(kind, {"steps": 10, "model": {"preset": "tiny"}}, {"ingest": "abd"}) != key
    other = StageKind(name="other", params="x:y", run=kind.run, version=kind.version)
    assert stage_key(other, {"steps": 10, "model": {"preset": "tiny"}}, {"ingest": "abc"}) != key


def test_hashes():
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})


def test_hash_files(tmp_path):
    (tmp_path / "x").write_bytes(b"1" * 3_000_000)
    (tmp_path / "y").write_bytes(b"2")
    h = hash_files([tmp_path / "x", tmp_path / "y"])
    (tmp_path / "y").write_bytes(b"3")
    assert hash_files([tmp_path / "x", tmp_path / "y"]) != h


def _record(uri: str) -> StageRecord:
    return StageRecord(stage="train", kind="train", key="k" * 64, uri=uri, values={"model_uri": "runs:/1/model"},
                       content_hash="c", run_id="1", seconds=1.5, finished_at="now", metrics={"loss": 0.1})


def test_records_round_trip_and_mark_completion_locally(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    uri = storage.uri("stages", "train-abc")
    assert uri == str(tmp_path / "store" / "stages" / "train-abc")
    assert read_record(storage, uri) is None
    write_record(storage, _record(uri))
    assert read_record(storage, uri) == _record(uri)
    assert storage.work_dir(uri) == tmp_path / "store" / "stages" / "train-abc"
    assert storage.localize(uri) == storage.work_dir(uri)
    storage.delete_dir(uri)
    assert read_record(storage, uri) is None


def test_relative_and_file_roots_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage(".raydiff").root == str(tmp_path / ".raydiff")
    assert Storage(f"file://{tmp_path}/x").root == str(tmp_path / "x")
    assert is_remote("s3://bucket/p") and not is_remote("/a/b") and not is_remote("file:///a")


def test_remote_roots_publish_and_download(tmp_path, monkeypatch, s3_server):
    """A real S3 API (moto's server on loopback): publish a stage, write its record, localize a split."""
    endpoint, credentials = s3_server
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    bucket = s3_bucket(endpoint, "cache-test")
    storage = Storage(bucket.replace("cache-test?", "cache-test/pipes?"))
    uri = storage.uri("stages", "ingest-abc")
    assert uri == f"s3://cache-test/pipes/stages/ingest-abc?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    work = storage.work_dir(uri)
    assert str(work).startswith(str(tmp_path / "cache"))
    (work / "train").mkdir(parents=True)
    (work / "train" / "shard-000.tar").write_bytes(b"data")
    storage.publish(work, uri)
    write_record(storage, _record(uri))
    assert read_record(storage, uri) == _record(uri)
    split_uri = storage.uri("stages", "ingest-abc", "train")
    local = storage.localize(split_uri)
    assert (local / "shard-000.tar").read_bytes() == b"data" and local != work / "train"
