"""How much work one call may ask of the gateway, each limit refused with INVALID_ARGUMENT naming
the setting that raises it."""

from __future__ import annotations

from dataclasses import dataclass

from chassis.errors import InvalidArgument


@dataclass(frozen=True)
class Limits:
    """Per-call bounds, from the gateway's settings."""

    max_batch_requests: int = 50_000
    max_bytes_elements: int = 100_000

    def check_batch(self, count: int) -> None:
        """A PredictBatch asks for at most `max_batch_requests` predictions."""
        if count > self.max_batch_requests:
            raise InvalidArgument(
                f"requests: {count} predictions in one PredictBatch, at most {self.max_batch_requests} "
                "are taken (gateway setting max_batch_requests); split the batch"
            )

    def check_strings(self, what: str, count: int, at_least: bool = False) -> None:
        """A string list, or a BYTES tensor built from strings, holds at most `max_bytes_elements`
        (`at_least`: counting stopped at `count`)."""
        if count > self.max_bytes_elements:
            raise InvalidArgument(
                f"{what}: {'more than ' if at_least else ''}{count - at_least} string elements, "
                f"at most {self.max_bytes_elements} are taken (gateway setting max_bytes_elements)"
            )
