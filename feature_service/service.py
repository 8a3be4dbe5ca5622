"""The FeatureService servicer: decode each request into the domain objects, run them, encode the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import Message
from grpc import aio

from chassis.auth import Role, method_roles
from chassis.errors import InvalidArgument, NotFound, Unavailable
from feature_service import convert
from feature_service.materialize import Format, MaterializeOutcome, Materializer, MaterializeSpec
from feature_service.parity import ParityChecker
from feature_service.parity_rpcs import ParityRpcs
from feature_service.reader import Catalog, FeatureQuery, FeatureReader, ViewEntry, answer_to_wire
from feature_service.writer import FeatureWriter, rejection_to_proto
from fresco.api.features.v1 import feature_service_pb2 as pb
from fresco.api.features.v1 import feature_service_pb2_grpc as pb_grpc
from fresco.api.features.v1 import statistics_pb2 as spb

Context: TypeAlias = aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_FORMATS: dict[int, Format | None] = {
    pb.FILE_FORMAT_UNSPECIFIED: None,
    pb.FILE_FORMAT_PARQUET: "parquet",
    pb.FILE_FORMAT_CSV: "csv",
}


@dataclass(frozen=True)
class Domain:
    """What the servicer runs on, built once definitions are loaded and the store is connected."""

    catalog: Catalog
    reader: FeatureReader
    writer: FeatureWriter
    materializer: Materializer
    max_values: int
    parity: ParityChecker


def spec_from_proto(request: pb.MaterializeRequest) -> MaterializeSpec:
    """A MaterializeRequest as a MaterializeSpec; errors name the field."""
    if request.format not in _FORMATS:
        raise InvalidArgument(f"format: expected a FileFormat (0, 1 or 2), got {request.format}")
    start = convert.seconds_of(request.start_time) if request.HasField("start_time") else None
    end = convert.seconds_of(request.end_time) if request.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        raise InvalidArgument(f"end_time: expected after start_time ({convert.utc(start)}), got {convert.utc(end)}")
    return MaterializeSpec(
        view=request.feature_view,
        source=request.source_uri,
        format=_FORMATS[request.format],
        join_key_columns=dict(request.join_key_columns),
        feature_columns=dict(request.feature_columns),
        event_timestamp_column=request.event_timestamp_column or "event_timestamp",
        start_s=start,
        end_s=end,
        dry_run=request.dry_run,
    )


def materialize_response(outcome: MaterializeOutcome) -> pb.MaterializeResponse:
    """A materialisation's outcome as the API reports it."""
    return pb.MaterializeResponse(
        feature_view=outcome.view,
        rows_read=outcome.rows_read,
        rows_written=outcome.rows_written,
        rows_rejected=outcome.rejections.count,
        rejected_rows=[rejection_to_proto(r) for r in outcome.rejections.rows],
        statistics=outcome.statistics,
    )


# The role each method needs once auth is on: writes to the online store need deployer.
METHOD_ROLES = method_roles(
    pb.DESCRIPTOR.services_by_name["FeatureService"],
    writes={"PushFeatures": Role.DEPLOYER, "Materialize": Role.DEPLOYER},
    reads=["GetFeatures", "ListFeatureViews", "GetFeatureView", "GetFeatureViewStatistics", "GetFeatureParity"],
)


class FeatureServicer(ParityRpcs, pb_grpc.FeatureServiceServicer):
    """fresco.features.v1.FeatureService over the reader, writer, materializer, catalog and parity checker."""

    def __init__(self) -> None:
        self.domain: Domain | None = None

    def _domain(self) -> Domain:
        if self.domain is None:
            raise Unavailable("feature service is starting: definitions, store or bloom filters not ready yet")
        return self.domain

    def _parity_domain(self) -> tuple[ParityChecker, Catalog]:
        domain = self._domain()
        return domain.parity, domain.catalog

    async def GetFeatures(  # type: ignore[override]  # the response's wire form: see add_to_server
        self, request: pb.GetFeaturesRequest, context: Context
    ) -> bytes:
        domain = self._domain()
        query = FeatureQuery.from_proto(request, domain.catalog, domain.max_values)
        return answer_to_wire(await domain.reader.read(query))

    async def PushFeatures(
        self, request_iterator: AsyncIterator[pb.PushFeaturesRequest], context: Context
    ) -> pb.PushFeaturesResponse:
        outcome = await self._domain().writer.push(request_iterator)
        return pb.PushFeaturesResponse(
            accepted_count=outcome.accepted,
            rejected_count=outcome.rejections.count,
            rejected_rows=[rejection_to_proto(r) for r in outcome.rejections.rows],
            omitted_features=[
                pb.OmittedFeature(feature_view=view, feature=feature, row_count=count)
                for (view, feature), count in sorted(outcome.omitted.items())
            ],
        )

    async def Materialize(self, request: pb.MaterializeRequest, context: Context) -> pb.MaterializeResponse:
        return materialize_response(await self._domain().materializer.run(spec_from_proto(request)))

    async def ListFeatureViews(
        self, request: pb.ListFeatureViewsRequest, context: Context
    ) -> pb.ListFeatureViewsResponse:
        catalog = self._domain().catalog
        if request.page_size < 0:
            raise InvalidArgument(
                f"page_size: expected 0 (the default, {DEFAULT_PAGE_SIZE}) or more, got {request.page_size}"
            )
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise InvalidArgument(
                    f"page_token: expected a next_page_token of an earlier call, got {request.page_token!r}"
                )
            start = int(request.page_token)
        selector = dict(request.label_selector)
        views = [
            entry
            for _, entry in sorted(catalog.views.items())
            if all(entry.view.labels.get(k) == v for k, v in selector.items())
        ]
        page = views[start : start + size]
        more = start + size < len(views)
        return pb.ListFeatureViewsResponse(
            feature_views=[_view(catalog, entry) for entry in page],
            next_page_token=str(start + size) if more else "",
        )

    async def GetFeatureView(self, request: pb.GetFeatureViewRequest, context: Context) -> pb.GetFeatureViewResponse:
        catalog = self._domain().catalog
        return pb.GetFeatureViewResponse(feature_view=_view(catalog, catalog.entry(request.name, "name")))

    async def GetFeatureViewStatistics(
        self, request: pb.GetFeatureViewStatisticsRequest, context: Context
    ) -> pb.GetFeatureViewStatisticsResponse:
        entry = self._domain().catalog.entry(request.feature_view)
        if entry.statistics is None:
            raise NotFound(f"feature_view: view {request.feature_view!r} has never been materialised")
        statistics = spb.FeatureViewStatistics()
        statistics.CopyFrom(entry.statistics)
        if request.feature_names:
            unknown = [name for name in request.feature_names if name not in entry.features]
            if unknown:
                raise NotFound(f"feature_names: view {request.feature_view!r} has no feature(s) {unknown}")
            wanted = set(request.feature_names)
            kept = [f for f in statistics.features if f.feature_name in wanted]
            del statistics.features[:]
            statistics.features.extend(kept)
        return pb.GetFeatureViewStatisticsResponse(statistics=statistics)


def send_as_is(response: bytes | Message) -> bytes:
    """GetFeatures' response serializer: the servicer answers with the response's wire form, encoded once by
    hand (reader.answer_to_wire), which goes out as it is; a message (from nowhere today) is serialised."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class _Capture:
    """Stands in for a server to take the method handlers the generated registration makes."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict[str, Any]) -> None:
        self.methods = dict(methods)


def method_handlers(servicer: FeatureServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The generated code's handlers of the service's methods, except that GetFeatures' answers, already in their
    wire form, are sent as they are: serialised once, never parsed back into a message first."""
    capture = _Capture()
    pb_grpc.add_FeatureServiceServicer_to_server(servicer, cast("aio.Server", capture))
    capture.methods["GetFeatures"] = grpc.unary_unary_rpc_method_handler(
        servicer.GetFeatures,
        request_deserializer=pb.GetFeaturesRequest.FromString,
        response_serializer=send_as_is,
    )
    return capture.methods


def add_to_server(servicer: FeatureServicer, server: aio.Server) -> None:
    """Register the servicer's methods (see method_handlers), as the generated registration does."""
    methods = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    server.add_registered_method_handlers(SERVICE_NAME, methods)


def _view(catalog: Catalog, entry: ViewEntry) -> Any:
    return convert.view_to_proto(catalog.definitions, entry.view, entry.statistics, catalog.updated_at)
