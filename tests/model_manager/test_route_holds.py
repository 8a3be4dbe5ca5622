"""Version holds through the model manager's RPCs: a held version is loaded and routed at weight 0 (reachable only
by requests pinned to it, as experiment arms are), several holders add up, a release takes it out again, each change
is audited, and bad holds name their field."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc import aio

from fresco.api.models.v1 import model_manager_service_pb2 as pb
from model_manager.lifecycle import Stage
from tests.model_manager.rollout_support import LocalFleet, LocalHub, make_model, manager
from tests.model_manager.test_route_serving import route_where


def weights(route: object) -> dict[str, int]:
    return {v.version: v.weight for v in route.versions}  # type: ignore[attr-defined]


async def test_held_versions_are_warm_and_routed_at_weight_zero_until_released(tmp_path: Path) -> None:
    fleet, hub = LocalFleet(), LocalHub()
    async with manager(tmp_path, fleet, hub) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry, candidates=(2, 3))
        await route_where(hub, model, lambda r: weights(r) == {"1": 10000})
        held = await stub.HoldVersions(
            pb.HoldVersionsRequest(model_name=model, holder="experiment:a", versions=[2], reason="arms of a")
        )
        assert [(h.holder, list(h.versions)) for h in held.holds] == [("experiment:a", [2])]
        route = await route_where(hub, model, lambda r: weights(r) == {"1": 10000, "2": 0})
        assert next(v for v in route.versions if v.version == "2").endpoints, "a held version is warm"
        assert (model, 2) in fleet.retained

        await stub.HoldVersions(pb.HoldVersionsRequest(model_name=model, holder="experiment:b", versions=[2, 3]))
        await route_where(hub, model, lambda r: weights(r) == {"1": 10000, "2": 0, "3": 0})
        mm.registry.set_stage(model, 3, Stage.REJECTED, "tester")  # its gates failed since: arms never reach it
        mm.controller.wake()  # type: ignore[union-attr]
        await route_where(hub, model, lambda r: weights(r) == {"1": 10000, "2": 0})
        assert (model, 3) not in fleet.retained
        await stub.HoldVersions(pb.HoldVersionsRequest(model_name=model, holder="experiment:b"))
        await route_where(hub, model, lambda r: weights(r) == {"1": 10000, "2": 0})  # a still holds 2
        released = await stub.HoldVersions(pb.HoldVersionsRequest(model_name=model, holder="experiment:a"))
        assert list(released.holds) == []
        await route_where(hub, model, lambda r: weights(r) == {"1": 10000})
        assert (model, 3) not in fleet.retained

        audit = await stub.ListAuditRecords(pb.ListAuditRecordsRequest(model_name=model))
        actions = [(a.action, a.details["holder"]) for a in audit.records if a.action.startswith("model.")]
        assert ("model.hold", "experiment:a") in actions
        assert ("model.release", "experiment:a") in actions


@pytest.mark.parametrize(
    ("fields", "code", "named"),
    [
        ({"holder": ""}, grpc.StatusCode.INVALID_ARGUMENT, "holder"),
        ({"versions": [0]}, grpc.StatusCode.INVALID_ARGUMENT, "versions[0]"),
        ({"versions": [9]}, grpc.StatusCode.NOT_FOUND, "9"),
        ({"versions": [3]}, grpc.StatusCode.FAILED_PRECONDITION, "versions[0]"),
        ({"model_name": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ],
)
async def test_bad_holds_name_the_field(
    tmp_path: Path, fields: dict[str, object], code: grpc.StatusCode, named: str
) -> None:
    async with manager(tmp_path, LocalFleet(), LocalHub()) as (mm, stub):
        assert mm.registry is not None
        model = make_model(mm.registry, candidates=(2, 3))
        mm.registry.set_stage(model, 3, Stage.REJECTED, "tester")  # type: ignore[arg-type]
        request = pb.HoldVersionsRequest(model_name=model, holder="experiment:x", versions=[2])
        for name, value in fields.items():
            if name == "versions":
                del request.versions[:]
                request.versions.extend(value)  # type: ignore[arg-type]
            else:
                setattr(request, name, value)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.HoldVersions(request)
        assert err.value.code() == code
        assert named in (err.value.details() or "")
