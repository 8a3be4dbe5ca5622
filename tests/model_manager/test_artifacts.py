"""The content-addressed artifact store and uploads through it: good, corrupt, truncated, oversize, concurrent."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from chassis.errors import AlreadyExists, InvalidArgument, NotFound
from model_manager.artifacts import ArtifactStore
from model_manager.registry import Registry
from model_manager.uploads import VersionUploads
from tests.model_manager.registry_support import (
    database_url,
    model_spec,
    postgres_server,
    registry,
    version_spec,
)

__all__ = ["database_url", "postgres_server", "registry"]

CONTENT = bytes(range(256)) * 1000  # 256 kB


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"), max_bytes=1 << 20)


def upload(store: ArtifactStore, chunks: Iterable[bytes], digest: str, expected_size: int = 0):
    pending = store.begin(expected_size)
    try:
        for chunk in chunks:
            pending.write(chunk)
    except BaseException:
        pending.abort()
        raise
    return pending.finish(digest)


def split(content: bytes, size: int = 10_000) -> list[bytes]:
    return [content[i : i + size] for i in range(0, len(content), size)]


def test_an_upload_is_stored_under_its_sha256_and_leaves_no_temporary(store: ArtifactStore, tmp_path: Path) -> None:
    stored = upload(store, split(CONTENT), sha(CONTENT), len(CONTENT))
    assert (stored.sha256, stored.size_bytes, stored.created) == (sha(CONTENT), len(CONTENT), True)
    path = tmp_path / "artifacts" / "sha256" / sha(CONTENT)[:2] / sha(CONTENT)
    assert stored.uri == f"file://{path}"
    assert path.read_bytes() == CONTENT == store.read(stored.sha256)
    assert files_under(tmp_path / "artifacts") == [path]


@pytest.mark.parametrize(
    ("chunks", "declared_sha", "declared_size", "message"),
    [
        ([CONTENT[:-1] + b"\x00"], sha(CONTENT), 0, "metadata.expected_sha256: the 256000 bytes received hash to"),
        ([CONTENT[:1000]], sha(CONTENT), len(CONTENT), "the upload ended after 1000 bytes.*truncated"),
        ([CONTENT, b"x"], sha(CONTENT), len(CONTENT), "chunk: more bytes than metadata.expected_size_bytes"),
        ([CONTENT] * 5, sha(CONTENT * 5), 0, "exceeds the registry's limit of 1048576 bytes"),
        ([], sha(b""), 0, "chunk: no artifact bytes were sent"),
    ],
    ids=["bad-sha256", "truncated", "longer-than-declared", "over-the-limit", "empty"],
)
def test_a_corrupt_upload_is_refused_and_leaves_nothing(
    store: ArtifactStore, tmp_path: Path, chunks: list[bytes], declared_sha: str, declared_size: int, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        upload(store, chunks, declared_sha, declared_size)
    assert files_under(tmp_path / "artifacts") == []
    assert store.temporary_files() == []


def test_the_same_content_is_stored_once(store: ArtifactStore, tmp_path: Path) -> None:
    first = upload(store, [CONTENT], sha(CONTENT))
    second = upload(store, split(CONTENT, 777), sha(CONTENT))
    assert (first.created, second.created, first.uri) == (True, False, second.uri)
    assert len(files_under(tmp_path / "artifacts")) == 1


def test_concurrent_uploads_of_the_same_content_leave_one_whole_file(store: ArtifactStore, tmp_path: Path) -> None:
    barrier = threading.Barrier(6)
    results: list[object] = []

    def run() -> None:
        barrier.wait()
        results.append(upload(store, split(CONTENT, 4096), sha(CONTENT)).sha256)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [sha(CONTENT)] * 6
    assert [p.read_bytes() == CONTENT for p in files_under(tmp_path / "artifacts")] == [True]
    assert store.temporary_files() == []


def test_an_object_store_plugs_in_by_url() -> None:
    root = f"memory://fresco-test-{uuid.uuid4().hex}"
    store = ArtifactStore(root, max_bytes=1 << 20)
    stored = upload(store, split(CONTENT), sha(CONTENT))
    assert stored.uri.startswith("memory://")
    assert store.read(stored.sha256) == CONTENT
    assert store.exists(stored.sha256)
    assert store.temporary_files() == []
    store.delete(stored.sha256)
    assert not store.exists(stored.sha256)


def test_leftovers_of_a_crash_are_cleared_at_start(store: ArtifactStore) -> None:
    pending = store.begin()
    pending.write(b"half an artifact")
    assert len(store.temporary_files()) == 1
    assert store.clear_temporary() == 1
    assert store.temporary_files() == []


async def _stream(chunks: Iterable[bytes], consumed: list[int] | None = None) -> AsyncIterator[bytes]:
    for chunk in chunks:
        if consumed is not None:
            consumed.append(len(chunk))
        yield chunk


async def test_a_version_upload_stores_and_registers(registry: Registry, store: ArtifactStore) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    uploads = VersionUploads(registry, store)
    record = await uploads.upload(version_spec("churn", CONTENT), _stream(split(CONTENT)), identity="ci", reason="r")
    assert (record.version, record.sha256, record.artifact_uri) == (1, sha(CONTENT), store.uri(sha(CONTENT)))
    assert store.read(record.sha256) == CONTENT
    again = await uploads.upload(version_spec("churn", CONTENT), _stream([CONTENT]), identity="ci")
    assert (again.version, again.artifact_uri) == (2, record.artifact_uri)


async def test_a_corrupt_version_upload_leaves_no_file_and_no_row(
    registry: Registry, store: ArtifactStore, tmp_path: Path
) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    uploads = VersionUploads(registry, store)
    spec = version_spec("churn", CONTENT)
    with pytest.raises(InvalidArgument, match=r"metadata.expected_sha256"):
        await uploads.upload(spec, _stream(split(CONTENT[:-1] + b"!")), identity="ci")
    assert files_under(tmp_path / "artifacts") == []
    assert registry.list_versions("churn").items == []
    assert [e.action for e in registry.list_audit().items] == ["model.create"]


async def test_an_upload_for_an_unknown_model_reads_no_chunk(registry: Registry, store: ArtifactStore) -> None:
    consumed: list[int] = []
    with pytest.raises(NotFound, match=r"metadata.model_name: no model named 'ghost'"):
        await VersionUploads(registry, store).upload(
            version_spec("ghost", CONTENT), _stream([CONTENT], consumed), identity="ci"
        )
    assert consumed == []
    assert store.temporary_files() == []


async def test_a_registration_lost_after_the_upload_removes_the_new_artifact(
    registry: Registry, store: ArtifactStore, tmp_path: Path
) -> None:
    """Version 1 is free when the upload starts and taken by another registration before it ends."""
    registry.create_model(model_spec("churn"), identity="alice")
    uploads = VersionUploads(registry, store)

    async def racing_chunks() -> AsyncIterator[bytes]:
        yield CONTENT[:1000]
        await uploads.upload(version_spec("churn", b"other", version=1), _stream([b"other"]), identity="fast")
        yield CONTENT[1000:]

    with pytest.raises(AlreadyExists, match=r"version 1 of churn exists already"):
        await uploads.upload(version_spec("churn", CONTENT, version=1), racing_chunks(), identity="slow")
    assert not store.exists(sha(CONTENT))
    assert [p.name for p in files_under(tmp_path / "artifacts")] == [sha(b"other")]
    assert [v.created_by for v in registry.list_versions("churn").items] == ["fast"]


async def test_a_cancelled_upload_leaves_no_temporary(registry: Registry, store: ArtifactStore) -> None:
    registry.create_model(model_spec("churn"), identity="alice")
    started = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield CONTENT[:1000]
        started.set()
        await asyncio.Event().wait()
        yield b""

    task = asyncio.create_task(VersionUploads(registry, store).upload(version_spec("churn", CONTENT), stalled(), "ci"))
    await started.wait()
    assert len(store.temporary_files()) == 1  # opened before the first chunk was read
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.temporary_files() == []
    assert registry.list_versions("churn").items == []
