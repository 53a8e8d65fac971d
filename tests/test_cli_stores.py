"""The deltakv command with store URLs on the .dkv side: convert -o URL, restore URL, inspect URL,
validate URL, against a real redis-server and moto's S3 server (tests/servers.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from deltakv_format.stores import open_entry
from deltakv_tools.cli import main

from .conftest import FIXTURES
from .servers import RedisServer, S3_BUCKET, shared_redis_url, shared_s3_endpoint
from .test_stores import key_prefix

SOURCE = FIXTURES / "smollm2_v10_fa0.ggsn"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def entry_url(kind: str, tmp_path, monkeypatch) -> str:
    prefix = key_prefix(tmp_path)
    if kind == "redis":
        return f"{shared_redis_url()}/{prefix}/session.dkv"
    if kind == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", shared_s3_endpoint())  # how a user points s3fs at a server
        return f"s3://{S3_BUCKET}/{prefix}/session.dkv"
    return f"file://{tmp_path}/store/session.dkv"


@pytest.mark.parametrize("kind", ["redis", "s3", "file"])
def test_convert_to_a_store_url_then_inspect_validate_and_restore_from_it(tmp_path, monkeypatch, kind):
    if not SOURCE.exists():
        pytest.skip(f"fixture {SOURCE.name} missing")
    if kind == "file":
        (tmp_path / "store").mkdir()
    url = entry_url(kind, tmp_path, monkeypatch)
    r = cli("convert", SOURCE, "-o", url, "--codec", "raw")
    assert r.exit_code == 0, r.output
    assert f"-> {url} (" in r.output

    r = cli("inspect", url, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    store, name = open_entry(url)
    assert info["kind"] == "dkv" and info["file"] == url
    assert info["bytes"]["file"] == {i.name: i.size for i in store.list()}[name]

    r = cli("validate", url)
    assert r.exit_code == 0 and r.output.strip().endswith(f"{url}: ok"), r.output

    r = cli("restore", url, "-o", tmp_path / "back.bin", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "back.bin").read_bytes() == SOURCE.read_bytes()  # raw: byte-identical

    r = cli("convert", SOURCE, "-o", url, "--codec", "raw", "-q")
    assert r.exit_code == 2 and "exists; pass --force" in r.output
    assert cli("convert", SOURCE, "-o", url, "--codec", "raw", "-q", "--force").exit_code == 0

    monkeypatch.chdir(tmp_path)
    assert cli("restore", url, "-q").exit_code == 0  # the default output: the entry's name with .bin, here
    assert (tmp_path / "session.bin").read_bytes() == SOURCE.read_bytes()


def test_a_corrupted_entry_in_redis_is_a_problem_for_validate(tmp_path, monkeypatch):
    url = entry_url("redis", tmp_path, monkeypatch)
    assert cli("convert", SOURCE, "-o", url, "--codec", "raw", "-q").exit_code == 0
    store, name = open_entry(url)
    with store.get(name) as data:
        broken = bytearray(data)
    broken[len(broken) // 2] ^= 0x10  # inside the K/V payloads
    store.put(name, broken)
    r = cli("validate", url)
    assert r.exit_code in (1, 2) and "checksum" in r.output.lower(), r.output


@pytest.mark.parametrize("args, found", [
    (["inspect", "redis://127.0.0.1:1/0/../x.dkv"], "'..' in the path"),
    (["restore", "s3://bucket/.hidden", "-o", "x.bin"], "entry name '.hidden'"),
    (["inspect", "gopher://host/x.dkv"], "found gopher://"),
    (["validate", "redis://127.0.0.1:6379/notadb/x.dkv"], "DB a number"),
])
def test_bad_store_urls_are_one_line_errors(tmp_path, monkeypatch, args, found):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.exit_code == 2 and found in r.output and r.output.count("\n") == 1, r.output


def test_a_missing_entry_and_an_unreachable_server_are_one_line_errors(tmp_path, monkeypatch):
    url = entry_url("redis", tmp_path, monkeypatch)
    r = cli("inspect", url)
    assert r.exit_code == 2 and "no entry 'session.dkv'" in r.output and r.output.count("\n") == 1, r.output
    down = RedisServer(tmp_path)  # a port nobody listens on
    r = cli("restore", f"{down.url}/a.dkv", "-o", tmp_path / "x.bin")
    assert r.exit_code == 2 and "cannot reach the Redis server" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "x.bin").exists()
