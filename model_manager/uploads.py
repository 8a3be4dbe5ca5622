"""Registering a version from a stream of artifact chunks: checked before the first byte, stored only if whole and
matching its digest, recorded only once stored; a refused upload leaves no file and no row."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable

from model_manager import schema
from model_manager.artifacts import ArtifactStore
from model_manager.records import StoredArtifact, VersionRecord, VersionSpec
from model_manager.registry import Registry

log = logging.getLogger(__name__)


class VersionUploads:
    """Uploads of versions into the registry and its artifact store."""

    def __init__(self, registry: Registry, store: ArtifactStore) -> None:
        self.registry = registry
        self.store = store

    async def upload(
        self, spec: VersionSpec, chunks: AsyncIterable[bytes], identity: str, reason: str = ""
    ) -> VersionRecord:
        """Store the streamed artifact under its sha256 and register the version; refusals keep nothing."""
        spec = schema.version_spec(spec)
        schema.text("metadata.reason", reason, schema.MAX_TEXT)
        # Before any byte: an unknown model, a taken number or a missing parent is refused at once.
        await asyncio.to_thread(self.registry.check_can_register, spec)
        upload = await asyncio.to_thread(self.store.begin, spec.expected_size_bytes)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(upload.write, chunk)
            artifact = await asyncio.to_thread(upload.finish, spec.expected_sha256)
        except BaseException:
            upload.abort()
            raise
        # The row is written in a thread that runs to its end even if the caller goes away, so that the
        # cleanup below knows whether a row references the artifact.
        register = asyncio.ensure_future(
            asyncio.to_thread(self.registry.register_version, spec, artifact, identity, reason)
        )
        try:
            return await asyncio.shield(register)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await register
            if register.done() and (register.cancelled() or register.exception() is not None):
                self._drop_if_unreferenced(artifact)
            raise
        except BaseException:
            self._drop_if_unreferenced(artifact)
            raise

    def _drop_if_unreferenced(self, artifact: StoredArtifact) -> None:
        # Only an artifact this upload created, and only while no version uses it: another upload of the same bytes
        # may have registered meanwhile.
        if not artifact.created:
            return
        try:
            if self.registry.references(artifact.sha256) == 0:
                self.store.delete(artifact.sha256)
        except Exception:  # the registration's own error is the one to report
            log.exception("could not clean up artifact %s after a failed registration", artifact.sha256)
