"""The fleet RPCs of ModelManagerService: predictors register, heartbeat, and are listed."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from chassis.errors import InvalidArgument, Unavailable
from fresco.api.models.v1 import fleet_pb2 as fpb
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager import schema
from model_manager.fleet import Fleet
from model_manager.predictors import Copy, Predictor, PredictorState, Report

if TYPE_CHECKING:
    from model_manager.service import Domain

Context: TypeAlias = aio.ServicerContext[Any, Any]
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_COPIES = 10_000
_STATES = {
    PredictorState.READY: fpb.PREDICTOR_STATE_READY,
    PredictorState.UNHEALTHY: fpb.PREDICTOR_STATE_UNHEALTHY,
    PredictorState.LOST: fpb.PREDICTOR_STATE_LOST,
}


def _address(field: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgument(
            f"{field}: expected an IP literal and a port, as 10.0.0.7:8001 or [::1]:8001, got {value[:80]!r}"
        )


def report_of(info: fpb.PredictorInfo, field: str = "predictor") -> Report:
    """A predictor's report from its message, checked field by field."""
    if not _ID.fullmatch(info.predictor_id):
        raise InvalidArgument(
            f"{field}.predictor_id: expected 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter "
            f"or digit, got {info.predictor_id[:140]!r}"
        )
    _address(f"{field}.address", info.address)
    if not info.boot_id or len(info.boot_id) > 128:
        raise InvalidArgument(f"{field}.boot_id: expected a non-empty id of this process start, at most 128 characters")
    schema.text(f"{field}.zone", info.zone, 63)
    schema.labels(f"{field}.labels", dict(info.labels))
    for name in ("memory_capacity_bytes", "memory_used_bytes"):
        if getattr(info, name) < 0:
            raise InvalidArgument(f"{field}.{name}: expected 0 or more bytes, got {getattr(info, name)}")
    if len(info.loaded_models) > _MAX_COPIES:
        raise InvalidArgument(f"{field}.loaded_models: expected at most {_MAX_COPIES}, got {len(info.loaded_models)}")
    copies = []
    for index, loaded in enumerate(info.loaded_models):
        where = f"{field}.loaded_models[{index}]"
        if not loaded.predictor_model_name:
            raise InvalidArgument(f"{where}.predictor_model_name: expected the name the predictor serves it under")
        schema.text(f"{where}.predictor_model_name", loaded.predictor_model_name)
        if loaded.model_name:
            schema.model_name(f"{where}.model_name", loaded.model_name)
        schema.version_number(f"{where}.version", loaded.version, zero_ok=True)
        if loaded.memory_bytes < 0:
            raise InvalidArgument(f"{where}.memory_bytes: expected 0 or more bytes, got {loaded.memory_bytes}")
        if not math.isfinite(loaded.request_rate) or loaded.request_rate < 0:
            rate = loaded.request_rate
            raise InvalidArgument(f"{where}.request_rate: expected a finite rate of 0 or more, got {rate}")
        copies.append(
            Copy(
                loaded.predictor_model_name,
                loaded.model_name,
                loaded.version,
                loaded.ready,
                loaded.memory_bytes,
                loaded.request_rate,
            )
        )
    return Report(
        predictor_id=info.predictor_id,
        address=info.address,
        boot_id=info.boot_id,
        zone=info.zone,
        labels=tuple(sorted(info.labels.items())),
        healthy=info.healthy,
        memory_capacity_bytes=info.memory_capacity_bytes,
        memory_used_bytes=info.memory_used_bytes,
        copies=tuple(copies),
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def predictor_message(predictor: Predictor) -> fpb.PredictorInfo:
    """A predictor as ListPredictors shows it: its last report, its copies as the manager sees them, its state."""
    report = predictor.report
    return fpb.PredictorInfo(
        predictor_id=report.predictor_id,
        address=report.address,
        labels=dict(report.labels),
        zone=report.zone,
        boot_id=report.boot_id,
        healthy=report.healthy,
        memory_capacity_bytes=report.memory_capacity_bytes,
        memory_used_bytes=report.memory_used_bytes,
        loaded_models=[
            fpb.LoadedModel(
                predictor_model_name=c.predictor_model_name,
                model_name=c.model_name,
                version=c.version,
                ready=c.ready,
                memory_bytes=c.memory_bytes,
                request_rate=c.request_rate,
            )
            for _, c in sorted(predictor.copies.items())
        ],
        state=_STATES[predictor.state],
        registered_at=_timestamp(predictor.registered_at),
        last_heartbeat_at=_timestamp(predictor.last_heartbeat_at),
    )


class FleetRpcs:
    """RegisterPredictor, PredictorHeartbeat and ListPredictors over the domain's `Fleet`."""

    def _domain(self) -> Domain:
        raise NotImplementedError  # ModelManagerServicer provides it

    def _fleet(self) -> Fleet:
        fleet = self._domain().fleet
        if fleet is None:
            raise Unavailable("model manager is starting: the fleet is not ready yet; retry")
        return fleet

    async def RegisterPredictor(
        self, request: pb.RegisterPredictorRequest, context: Context
    ) -> pb.RegisterPredictorResponse:
        fleet = self._fleet()
        predictor = fleet.register(report_of(request.predictor))
        return pb.RegisterPredictorResponse(
            predictor=predictor_message(predictor),
            heartbeat_interval=_duration(fleet.heartbeat_interval_s),
            lease=_duration(fleet.lease_s),
        )

    async def PredictorHeartbeat(
        self, request: pb.PredictorHeartbeatRequest, context: Context
    ) -> pb.PredictorHeartbeatResponse:
        fleet = self._fleet()
        known = fleet.heartbeat(report_of(request.predictor))
        return pb.PredictorHeartbeatResponse(known=known, heartbeat_interval=_duration(fleet.heartbeat_interval_s))

    async def ListPredictors(self, request: pb.ListPredictorsRequest, context: Context) -> pb.ListPredictorsResponse:
        chosen, token = self._fleet().predictors.page(request.page_size, request.page_token)
        return pb.ListPredictorsResponse(predictors=[predictor_message(p) for p in chosen], next_page_token=token)
