"""Where one stage hands a folder to another on a cluster whose nodes share no local disk.

``cluster.storage_path`` is the one storage root: a local folder (the default: one machine, or a mount every
node shares, e.g. NFS) or a URI (``s3://bucket/prefix``, ``gs://...``) that pyarrow's filesystems open. Ray
Train writes its checkpoints there (``RunConfig(storage_path=..., storage_filesystem=...)``), and a training
run on a URI root publishes its export there too (``<root>/<run>/export``).

Consumers need a local folder (vLLM and HF load from disk), so a replica or worker on any node fetches a
published folder into a node-local cache before loading it (:func:`local_copy`). The content check is a
manifest the exporter writes into every export folder (``tract-manifest.json``: each file's size and SHA-256):
an upload writes it last (its presence means the upload finished), a fetch verifies every file against it
before the cached copy is published, and the cache entry is keyed by the manifest's own hash, so a new export
at the same URI is fetched again rather than served stale.

The pipeline's other hand-overs (CoT shards, ``stage2.jsonl``, evaluation outputs) are small files the driver
writes; on a URI root it keeps its local folder as the working copy and mirrors it under
``<root>/<pipeline>/`` (:func:`mirror_of`): a committed shard is uploaded as it is committed (a single PUT: a
reader sees the whole object or none), a rerun first fetches the shards the URI has and the folder lacks
(:func:`sync_missing`), so generation resumes from what is on the URI, whichever node its driver runs on.

Credentials come only from the environment of each node (pyarrow reads ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` or an instance role, like boto3); nothing
here writes, logs or uploads them, and a URI with a user:password part is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from tract_dist.errors import TractError
from tract_dist.fsutil import _cache_dir, atomic_write_json, publish_dir_once
from tract_dist.identity import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "tract-manifest.json"


class StorageError(TractError, RuntimeError):
    """A published folder is missing, unfinished, or its content does not match its manifest."""


def is_uri(path: str | None) -> bool:
    """Whether ``path`` names remote storage (``scheme://``); ``file://`` and plain paths are local."""
    return bool(path) and "://" in str(path) and not str(path).startswith("file://")


def _check_no_inline_secret(uri: str) -> None:
    netloc = uri.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise StorageError(f"storage URI {uri.split('://', 1)[0]}://...@{netloc.split('@', 1)[1]} carries "
                           "credentials; give them in the environment (e.g. AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY) instead, never in the config")


def filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local folder or a URI; credentials from the environment."""
    import pyarrow.fs

    if not is_uri(path):
        local = path[len("file://"):] if path.startswith("file://") else path
        return pyarrow.fs.LocalFileSystem(), str(Path(local).resolve())
    _check_no_inline_secret(path)
    return pyarrow.fs.FileSystem.from_uri(path)


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a URI or a local folder."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def ray_storage(storage_path: str) -> tuple[str, Any]:
    """``RunConfig``'s ``(storage_path, storage_filesystem)``: an absolute local folder and None, or the path
    inside the URI's pyarrow filesystem and that filesystem (built here, so its credentials and endpoint are
    this driver's environment's, and Ray's workers get the same filesystem object)."""
    if not is_uri(storage_path):
        return filesystem(storage_path)[1], None
    fs, inner = filesystem(storage_path)
    return inner, fs


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/tract-manifest.json``: every file's relative name, size and SHA-256 (the exporter calls
    this before publishing, so every export carries its own content check)."""
    folder = Path(folder)
    manifest = {"version": 1, "files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                                          "sha256": file_sha256(p)}
                                        for p in _files(folder)}}
    atomic_write_json(folder / MANIFEST, manifest, sort_keys=True)
    return manifest


def verify_manifest(folder: str | Path, where: str | None = None) -> dict[str, Any]:
    """Check ``folder`` against its manifest (every listed file present with its size and SHA-256, nothing
    unlisted); raises :class:`StorageError` naming the first file that differs."""
    folder = Path(folder)
    where = where or str(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{where}: no readable {MANIFEST} ({e}); not a published export, or its upload did "
                           "not finish") from None
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    extra = sorted(present - set(listed))
    if extra:
        raise StorageError(f"{where}: {extra[0]} is not in its {MANIFEST} ({len(extra)} unlisted file(s))")
    for name, want in sorted(listed.items()):
        p = folder / name
        if name not in present:
            raise StorageError(f"{where}: {name} listed in {MANIFEST} is missing")
        size = p.stat().st_size
        if size != want["size"]:
            raise StorageError(f"{where}: {name} has {size} bytes, its {MANIFEST} says {want['size']}")
        if file_sha256(p) != want["sha256"]:
            raise StorageError(f"{where}: {name} does not match the SHA-256 in its {MANIFEST}")
    return manifest


def upload_dir(local: str | Path, dest: str) -> None:
    """Copy a local folder that holds a manifest to ``dest`` (a URI or a local folder) with pyarrow, manifest
    last: a reader that finds the manifest finds every file it lists. An older manifest at ``dest`` is removed
    first, so a half-finished re-upload is never taken for a finished one."""
    import pyarrow.fs

    local = Path(local)
    if not (local / MANIFEST).is_file():
        write_manifest(local)
    fs, inner = filesystem(dest)
    try:
        fs.delete_file(f"{inner}/{MANIFEST}")
    except (FileNotFoundError, OSError):
        pass
    fs.create_dir(inner, recursive=True)
    src = pyarrow.fs.LocalFileSystem()
    for p in _files(local):
        rel = p.relative_to(local).as_posix()
        if "/" in rel:
            fs.create_dir(f"{inner}/{rel.rsplit('/', 1)[0]}", recursive=True)
        pyarrow.fs.copy_files(str(p), f"{inner}/{rel}", source_filesystem=src, destination_filesystem=fs)
    pyarrow.fs.copy_files(str(local / MANIFEST), f"{inner}/{MANIFEST}", source_filesystem=src,
                          destination_filesystem=fs)
    log.info("uploaded %s to %s", local, dest)


def cache_root() -> Path:
    """This node's cache of fetched folders: ``$TRACT_DIST_CACHE/storage`` (default ``~/.cache/tract-dist``)."""
    return _cache_dir() / "storage"


def fetch_dir(uri: str, cache: str | Path | None = None) -> Path:
    """A verified node-local copy of the published folder at ``uri``.

    The entry is named after the manifest's hash: a second fetch of the same export is free, a new export at
    the same URI is a new entry. The copy is built in a temporary folder, checked file by file against the
    manifest, and renamed into place (``publish_dir_once``: replicas fetching at the same time keep one)."""
    import pyarrow.fs

    fs, inner = filesystem(uri)
    try:
        with fs.open_input_stream(f"{inner}/{MANIFEST}") as f:
            raw = f.read()
    except (FileNotFoundError, OSError) as e:
        raise StorageError(f"{uri}: no {MANIFEST} ({e}); not a published export, or its upload did not "
                           "finish") from None
    final = Path(cache or cache_root()) / hashlib.sha256(raw).hexdigest()[:24] / Path(inner).name
    if (final / MANIFEST).is_file():
        return final

    def build(tmp: Path) -> None:
        listed = json.loads(raw)["files"]
        dst = pyarrow.fs.LocalFileSystem()
        for name in sorted(listed):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(f"{inner}/{name}", str(tmp / name), source_filesystem=fs,
                                  destination_filesystem=dst)
        (tmp / MANIFEST).write_bytes(raw)
        verify_manifest(tmp, where=uri)

    publish_dir_once(final, build)
    log.info("fetched %s into %s", uri, final)
    return final


def local_copy(path: str | None) -> str | None:
    """``path`` itself when local (or a hub name); for a URI, this node's verified cached copy of it."""
    if path is None or not is_uri(path):
        return path
    return str(fetch_dir(path))


def mirror_of(root: str, *parts: str) -> str | None:
    """Where a hand-over folder or file is mirrored: ``root/parts`` when ``root`` is a URI; None for a local root
    (one machine or a shared mount: the local folder is the hand-over itself)."""
    return join(root, *parts) if is_uri(root) else None


def _listing(fs: Any, inner: str) -> dict[str, int]:
    """Relative name -> size of every file under ``inner`` (nothing when it does not exist)."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True, allow_not_found=True))
    return {i.path[len(inner.rstrip("/")) + 1:]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}


def put_file(local: str | Path, dest: str) -> None:
    """Upload (or copy) one local file to ``dest``, replacing what is there: one PUT on object stores."""
    import pyarrow.fs

    fs, inner = filesystem(dest)
    if not is_uri(dest):
        fs.create_dir(str(Path(inner).parent), recursive=True)
    pyarrow.fs.copy_files(str(local), inner, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def push_dir(local: str | Path, dest: str, include: Callable[[str], bool] = lambda name: True) -> int:
    """Upload every file of ``local`` whose relative name ``include`` accepts to ``dest``, replacing what is
    there (outputs a rerun rewrites: evaluation predictions, a generation summary); returns how many."""
    local = Path(local)
    names = [p.relative_to(local).as_posix() for p in sorted(local.rglob("*")) if p.is_file()]
    names = [n for n in names if include(n)]
    for n in names:
        put_file(local / n, join(dest, n))
    return len(names)


def sync_missing(local: str | Path, remote: str, include: Callable[[str], bool]) -> tuple[int, int]:
    """Make ``local`` and ``remote`` hold the same set of immutable files (committed shards): fetch what only
    the remote has, upload what only the local folder has (a commit whose upload was cut short); returns
    (fetched, uploaded). A name both hold with different sizes is two writers' work under one name: refused."""
    import pyarrow.fs

    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    fs, inner = filesystem(remote)
    there = {n: size for n, size in _listing(fs, inner).items() if include(n)}
    here = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    here = {n: size for n, size in here.items() if include(n)}
    clash = sorted(n for n in set(here) & set(there) if here[n] != there[n])
    if clash:
        raise StorageError(f"{join(remote, clash[0])} has {there[clash[0]]} bytes but {local / clash[0]} has "
                           f"{here[clash[0]]}: two writers committed different files under one name ({len(clash)} "
                           "such); keep one copy and remove the other")
    dst = pyarrow.fs.LocalFileSystem()
    fetched = sorted(set(there) - set(here))
    for n in fetched:
        final = local / n
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.fetch.tmp")  # a reader of the folder never sees half a file
        pyarrow.fs.copy_files(f"{inner}/{n}", str(tmp), source_filesystem=fs, destination_filesystem=dst)
        tmp.replace(final)
    uploaded = sorted(set(here) - set(there))
    for n in uploaded:
        put_file(local / n, join(remote, n))
    if fetched or uploaded:
        log.info("synced %s with %s: %d fetched, %d uploaded", local, remote, len(fetched), len(uploaded))
    return len(fetched), len(uploaded)


def storage_uri(storage_path: str, inner: str) -> str:
    """A path inside ``storage_path``'s filesystem (what Ray Train reports) as a URI again (as is when local)."""
    if not is_uri(storage_path) or is_uri(inner):
        return inner
    return f"{storage_path.split('://', 1)[0]}://{inner.lstrip('/')}"


def for_replicas(model_path: str) -> str:
    """What an engine spec names: a URI stays a URI (each replica fetches it on its own node, see
    ``runtime.backend.build_engine``); anything else is materialised here once (a GGUF alias is converted by the
    driver, not by every replica at once)."""
    if is_uri(model_path):
        return model_path
    from tract_dist.models.loading import materialize_alias

    return materialize_alias(model_path)
