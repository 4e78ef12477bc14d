"""tract_dist/storage.py on the local filesystem (the same pyarrow calls S3 takes; S3 itself, a second node and
the node-local caches: tests/multinode): the manifest, the upload that publishes it last, the verified fetch."""

from __future__ import annotations

import hashlib
import json

import pytest

from tract_dist import storage


def _folder(root, weights: bytes = b"w" * 1000):
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "tok.json").write_text("{}")
    return root


def test_manifest_upload_fetch_and_content_check(tmp_path):
    src = _folder(tmp_path / "export" / "model")
    manifest = storage.write_manifest(src)
    # independent reference: hashlib over each file
    assert manifest["files"]["model.safetensors"] == {"size": 1000,
                                                      "sha256": hashlib.sha256(b"w" * 1000).hexdigest()}
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "sub/tok.json"]

    dest = str(tmp_path / "store" / "run" / "export" / "model")
    storage.upload_dir(src, dest)
    cache = tmp_path / "cache-node"
    got = storage.fetch_dir(dest, cache)
    assert got.name == "model" and got.is_relative_to(cache)
    for name in manifest["files"]:
        assert (got / name).read_bytes() == (src / name).read_bytes()
    mtime = (got / "model.safetensors").stat().st_mtime_ns
    assert storage.fetch_dir(dest, cache) == got and (got / "model.safetensors").stat().st_mtime_ns == mtime

    # A new export at the same URI is a new cache entry, never the stale copy.
    (src / "model.safetensors").write_bytes(b"v" * 1000)
    storage.write_manifest(src)
    storage.upload_dir(src, dest)
    again = storage.fetch_dir(dest, cache)
    assert again != got and (again / "model.safetensors").read_bytes() == b"v" * 1000

    # Same size, other bytes at the source: the fetch refuses it, naming the file; nothing is cached.
    with open(f"{dest}/model.safetensors", "r+b") as f:
        f.write(b"x")
    with pytest.raises(storage.StorageError, match="model.safetensors does not match the SHA-256"):
        storage.fetch_dir(dest, tmp_path / "cache-other-node")
    assert not list((tmp_path / "cache-other-node").glob("*/model"))
    # An upload that did not finish (no manifest): refused by name.
    (tmp_path / "half").mkdir()
    with pytest.raises(storage.StorageError, match="no tract-manifest.json"):
        storage.fetch_dir(str(tmp_path / "half"), cache)
    # A file the manifest does not list.
    (src / "extra.bin").write_bytes(b"1")
    with pytest.raises(storage.StorageError, match="extra.bin is not in its tract-manifest.json"):
        storage.verify_manifest(src)


def test_uris_and_credentials():
    assert storage.is_uri("s3://b/p") and not storage.is_uri("/tmp/x") and not storage.is_uri("file:///tmp/x")
    assert storage.join("s3://b/p/", "run", "export") == "s3://b/p/run/export"
    assert storage.storage_uri("s3://b/p", "b/p/run/checkpoint_1") == "s3://b/p/run/checkpoint_1"
    assert storage.storage_uri("/data/ray", "/data/ray/run") == "/data/ray/run"
    assert storage.local_copy("/some/folder") == "/some/folder" and storage.local_copy("org/model") == "org/model"
    with pytest.raises(storage.StorageError, match="carries credentials") as e:
        storage.filesystem("s3://AKIA:secret@bucket/p")
    assert "secret" not in str(e.value) and "AKIA" not in str(e.value)
    path, fs = storage.ray_storage("runs/ray")
    assert fs is None and path.endswith("/runs/ray")
    json.dumps(path)
