"""The ExperimentService servicer: one mixin per RPC group, each in its own module, over the `Domain`."""

from __future__ import annotations

from chassis.auth import Role, method_roles
from experiment_service.assign_rpcs import AssignRpcs
from experiment_service.decision_rpcs import DecisionRpcs
from experiment_service.exposure_rpcs import ExposureRpcs
from experiment_service.outcome_rpcs import OutcomeRpcs
from experiment_service.registry_rpcs import RegistryRpcs
from experiment_service.result_rpcs import ResultRpcs
from experiment_service.watch_rpcs import WatchRpcs
from fresco.api.experiments.v1 import experiment_service_pb2 as pb
from fresco.api.experiments.v1 import experiment_service_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["ExperimentService"]
# The role each method needs once auth is on: changing experiments is a deployer's (admin includes it), and so is
# reporting exposures and outcomes (like the model manager's ReportMetrics); reading needs none, or viewer with
# --auth-require-for-reads (gateways watch the configuration with a viewer token).
METHOD_ROLES = method_roles(
    SERVICE,
    writes={
        name: Role.DEPLOYER
        for name in (
            "CreateExperiment", "UpdateExperiment", "StartExperiment", "StopExperiment", "DecideExperiment",
            "LogExposures", "LogOutcomes",
        )
    },
    reads=[
        "GetExperiment", "ListExperiments", "ListAuditEntries", "Assign", "WatchExperiments", "GetResults",
        "GetResultsHistory",
    ],
)  # fmt: skip


class ExperimentServicer(
    RegistryRpcs,
    WatchRpcs,
    AssignRpcs,
    ExposureRpcs,
    OutcomeRpcs,
    ResultRpcs,
    DecisionRpcs,
    pb_grpc.ExperimentServiceServicer,
):
    """fresco.experiments.v1.ExperimentService: each RPC group in its mixin."""
