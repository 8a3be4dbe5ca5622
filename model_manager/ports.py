"""What the rollout runtime needs from the predictor fleet and the gateways' route hub, as protocols.

The fleet (model_manager/fleet.py) and the route hub (model_manager/route_hub.py) satisfy these; the
controller depends only on them, so it runs on whatever the server wires in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from typing import Protocol

from model_manager.routes import Endpoint, RouteTable


class FleetPort(Protocol):
    """Places versions on predictors, loads and warms them, and says where they are warm."""

    async def ensure_loaded(
        self, model: str, version: int, *, replicas: int = 1, max_replicas: int = 0
    ) -> tuple[Endpoint, ...]:
        """Load and warm the version on `replicas` healthy predictors (copied to up to `max_replicas` as its request
        rate grows; 0 means `replicas`); the endpoints where it is warm."""
        ...

    def warm_endpoints(self, model: str, version: int) -> tuple[Endpoint, ...]:
        """Healthy predictors where the version is loaded and ready now."""
        ...

    def predictor_model_name(self, model: str, version: int) -> str:
        """The model name to send in ModelInfer to those endpoints."""
        ...

    async def release(self, model: str, version: int) -> None:
        """Unload the version from every predictor and stop placing it."""
        ...

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever some version's warm endpoints change."""
        ...

    def retain(self, wanted: Set[tuple[str, int]]) -> None:
        """The (model, version) pairs routes and rollouts want: copies of any other version nobody placed are
        leftovers, unloaded after a grace period."""
        ...


class RouteHubPort(Protocol):
    """Streams route tables to the gateways and collects their acknowledgements."""

    @property
    def table(self) -> RouteTable:
        """The current table."""
        ...

    def publish(self, table: RouteTable) -> None:
        """Make `table` current and stream it to every watching gateway; its revision exceeds the current one."""
        ...

    def seed(self, table: RouteTable, changed_at: Mapping[str, int]) -> None:
        """Serve `table`, the last one an earlier run published, until the next publish (only before any publish)."""
        ...

    def changed_at(self) -> dict[str, int]:
        """For each model, the revision its route last changed at."""
        ...

    def applied_revision(self, model: str) -> int:
        """The highest revision every connected gateway watching `model` accepted; 0 if none watches it."""
        ...

    async def wait_applied(self, model: str, revision: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until `revision` of `model` is applied, up to `timeout` seconds."""
        ...

    def rejections(self, model: str) -> list[tuple[str, int, str]]:
        """(gateway_id, revision, error) of rejected revisions, newest first."""
        ...

    def on_ack(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every ack, nack or disconnect."""
        ...
