"""Polling the model repository: new models load, changed ones reload, removed ones unload."""

from __future__ import annotations

import asyncio
import logging

from chassis.errors import FrescoError
from predictor.models import ModelStore

log = logging.getLogger(__name__)


class RepositoryPoller:
    """Keeps the store in step with the repository directory, one scan every `interval_s`."""

    def __init__(self, store: ModelStore, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._seen: dict[str, tuple[tuple[str, int, int], ...]] = {}

    def remember(self) -> None:
        """Take the repository as it is now as the baseline (after the initial load)."""
        repository = self.store.repository
        self._seen = {name: repository.fingerprint(name) for name in repository.model_names()}

    async def scan(self) -> list[str]:
        """One pass; returns the models it loaded, reloaded or unloaded."""
        repository = self.store.repository
        current = {name: repository.fingerprint(name) for name in repository.model_names()}
        changed = [name for name, print_ in current.items() if self._seen.get(name) != print_]
        removed = [name for name in self._seen if name not in current and name in self.store.models]
        for name in changed:
            try:
                await self.store.load(name)
            except FrescoError as err:
                log.warning("polling: model %s could not be loaded: %s", name, err)
        for name in removed:
            try:
                await self.store.unload(name)
            except FrescoError as err:
                log.warning("polling: model %s could not be unloaded: %s", name, err)
        self._seen = current
        return [*changed, *removed]

    async def run(self) -> None:
        """Scan forever (until cancelled)."""
        while True:
            await asyncio.sleep(self.interval_s)
            touched = await self.scan()
            if touched:
                log.info("polling: reloaded or unloaded %s", touched)
