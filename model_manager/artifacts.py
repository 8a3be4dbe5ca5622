"""The content-addressed artifact store: a version's bytes live under their sha256, written atomically, once.

The store is an fsspec filesystem (a local directory by default), so an object store plugs in by URL. Blocking:
the servicer calls it from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from chassis.errors import InvalidArgument
from model_manager.records import StoredArtifact


class ArtifactStore:
    """Artifacts under `<root>/sha256/<first two hex digits>/<sha256>`; uploads go through `<root>/tmp/`."""

    def __init__(self, url: str, max_bytes: int) -> None:
        self.fs: AbstractFileSystem
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.max_bytes = max_bytes
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        self.fs.makedirs(f"{self.root}/sha256", exist_ok=True)

    def path(self, sha256: str) -> str:
        """Where the artifact with this digest lives in the store's filesystem."""
        return f"{self.root}/sha256/{sha256[:2]}/{sha256}"

    def uri(self, sha256: str) -> str:
        """The artifact's URI, with the filesystem's protocol (file:///..., s3://...)."""
        return str(self.fs.unstrip_protocol(self.path(sha256)))

    def exists(self, sha256: str) -> bool:
        """Whether the store holds an artifact with this digest."""
        return bool(self.fs.exists(self.path(sha256)))

    def read(self, sha256: str) -> bytes:
        """The whole artifact (for tests and small models; predictors read the URI)."""
        return bytes(self.fs.cat_file(self.path(sha256)))

    def delete(self, sha256: str) -> None:
        """Remove the artifact if present: for one no version references."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(sha256))

    def temporary_files(self) -> list[str]:
        """Uploads in progress or left by a crash (the latter are safe to delete when the service starts)."""
        return [str(p) for p in self.fs.ls(f"{self.root}/tmp", detail=False)]

    def clear_temporary(self) -> int:
        """Delete leftover partial uploads; call only while no upload runs (at start). Returns how many."""
        leftovers = self.temporary_files()
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
        return len(leftovers)

    def sync_directory(self, path: str) -> None:
        """On a local disk, make a rename into `path` durable before the registry records it (no-op elsewhere)."""
        if not isinstance(self.fs, LocalFileSystem):
            return
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def begin(self, expected_size_bytes: int = 0) -> Upload:
        """Start an upload into a temporary file of its own."""
        return Upload(self, f"{self.root}/tmp/{uuid.uuid4().hex}", expected_size_bytes)


class Upload:
    """One artifact arriving in chunks: hashed and counted as it is written; kept only if its digest checks out."""

    def __init__(self, store: ArtifactStore, temp_path: str, expected_size_bytes: int) -> None:
        self.store = store
        self.temp_path = temp_path
        self.expected_size_bytes = expected_size_bytes
        self.size_bytes = 0
        self._hash = hashlib.sha256()
        self._file: Any = store.fs.open(temp_path, "wb")

    def write(self, chunk: bytes) -> None:
        """Append a chunk; INVALID_ARGUMENT once the bytes exceed the declared size or the store's limit."""
        self.size_bytes += len(chunk)
        if self.expected_size_bytes and self.size_bytes > self.expected_size_bytes:
            raise InvalidArgument(
                f"chunk: more bytes than metadata.expected_size_bytes ({self.expected_size_bytes}) were sent"
            )
        if self.size_bytes > self.store.max_bytes:
            raise InvalidArgument(
                f"chunk: the artifact exceeds the registry's limit of {self.store.max_bytes} bytes (max_artifact_bytes)"
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self, expected_sha256: str) -> StoredArtifact:
        """Check size and digest, then move the bytes under their digest (or drop them if already stored)."""
        try:
            if self.size_bytes == 0:
                raise InvalidArgument("chunk: no artifact bytes were sent after the metadata")
            if self.expected_size_bytes and self.size_bytes != self.expected_size_bytes:
                raise InvalidArgument(
                    f"chunk: the upload ended after {self.size_bytes} bytes; "
                    f"metadata.expected_size_bytes declared {self.expected_size_bytes} (truncated upload)"
                )
            digest = self._hash.hexdigest()
            if digest != expected_sha256:
                raise InvalidArgument(
                    f"metadata.expected_sha256: the {self.size_bytes} bytes received hash to {digest}, "
                    f"not {expected_sha256} (corrupt or wrong artifact)"
                )
            self._close(durable=True)
            store = self.store
            target = store.path(digest)
            created = not store.fs.exists(target)
            if created:
                store.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                # A rename on the same filesystem is atomic: readers see no artifact or the whole one. Two uploads
                # of the same bytes racing here both rename identical content into place, which is harmless.
                store.fs.mv(self.temp_path, target)
                store.sync_directory(target.rsplit("/", 1)[0])
            else:
                store.fs.rm_file(self.temp_path)
            return StoredArtifact(digest, self.size_bytes, store.uri(digest), created)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial upload (idempotent): nothing of it stays in the store."""
        self._close(durable=False)
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm_file(self.temp_path)

    def _close(self, durable: bool) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            if durable:
                file.flush()
                fileno = getattr(file, "fileno", None)
                if fileno is not None:
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        os.fsync(fileno())
        finally:
            file.close()
