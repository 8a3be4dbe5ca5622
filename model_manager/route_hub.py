"""The route table the gateways watch: a `chassis.revision_hub.RevisionHub` of route tables that also knows, for
each model, the revision its route last changed at. Plain domain object; `route_rpcs` streams it."""

from __future__ import annotations

from collections.abc import Mapping

from chassis.revision_hub import HISTORY, Rejection, RevisionHub, Watcher
from model_manager.routes import RouteError, RouteTable

__all__ = ["Rejection", "RouteHub", "Watcher", "changes"]


def changes(before: RouteTable, after: RouteTable, changed_at: Mapping[str, int]) -> dict[str, int]:
    """For each model, the revision its route last changed at once `after` follows `before`."""
    old = {r.model: r for r in before.routes}
    out = dict(changed_at)
    for route in after.routes:
        if old.get(route.model) != route:
            out[route.model] = after.revision
    return out


class RouteHub(RevisionHub[RouteTable]):
    """Publishes route tables to watching gateways (each watching some models, or all) and tracks their
    acknowledgements. Not thread-safe: call it on the server's event loop."""

    error = RouteError

    def __init__(self, history: int = HISTORY) -> None:
        super().__init__(RouteTable(0), history)
        self._changed_at: dict[str, int] = {}

    @property
    def table(self) -> RouteTable:
        """The current table (revision 0 and empty until the first publish)."""
        return self.current

    def _changing(self, item: RouteTable) -> None:
        self._changed_at = changes(self.current, item, self._changed_at)

    def seed(self, table: RouteTable, changed_at: Mapping[str, int] | None = None) -> None:
        """Serve `table`, the last one an earlier run published, until the next publish: a gateway holding its
        revision resumes from it. Only before the first publish."""
        self.check_seed(table)
        self._changed_at = dict(changed_at or {})
        super().seed(table)

    def changed_at(self) -> dict[str, int]:
        """For each model, the revision its route last changed at."""
        return dict(self._changed_at)
