"""GetFeatureParity: a mixin of FeatureServicer over the domain's ParityChecker."""

from __future__ import annotations

from typing import Any, TypeAlias

from grpc import aio

from feature_service.parity import ParityChecker
from feature_service.reader import Catalog, parse_ref
from fresco.api.features.v1 import feature_service_pb2 as pb

Context: TypeAlias = aio.ServicerContext[Any, Any]


def parity_response(
    checker: ParityChecker, catalog: Catalog, request: pb.GetFeatureParityRequest
) -> pb.GetFeatureParityResponse:
    """The counts of the refs asked for, in their order (every feature checked so far if none)."""
    if request.feature_refs:
        refs = [parse_ref(catalog, text, f"feature_refs[{i}]") for i, text in enumerate(request.feature_refs)]
        pairs = [(ref.view.view.name, ref.feature.name) for ref in refs]
    else:
        pairs = checker.checked()
    return pb.GetFeatureParityResponse(
        features=[checker.parity(view, feature) for view, feature in pairs], sample_rate=checker.sample_rate
    )


class ParityRpcs:
    """GetFeatureParity; the servicer provides `_parity_domain`."""

    def _parity_domain(self) -> tuple[ParityChecker, Catalog]:
        raise NotImplementedError

    async def GetFeatureParity(
        self, request: pb.GetFeatureParityRequest, context: Context
    ) -> pb.GetFeatureParityResponse:
        checker, catalog = self._parity_domain()
        return parity_response(checker, catalog, request)
