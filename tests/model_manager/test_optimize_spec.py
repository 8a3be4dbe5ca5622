"""Where an optimisation's budget comes from (the model's deployment, else the manager's default gates) and how a
loss is judged against it; checked on a real registry database."""

from __future__ import annotations

from pathlib import Path

import pytest

from chassis.errors import FailedPrecondition, InvalidArgument
from fresco.api.models.v1 import model_manager_service_pb2 as pb
from fresco.api.models.v1 import registry_pb2 as rpb
from model_manager.optimization import Budget
from model_manager.optimizer import OptimizeRequest, spec_gate
from model_manager.registry import Registry
from model_manager.rollout_store import RolloutStore, StoredDeployment
from model_manager.tables import sqlite_url

DEFAULT = rpb.BacktestGate(dataset_uri="file:///default.parquet", label_column="y", metric="auc")
OWN = rpb.BacktestGate(dataset_uri="file:///own.parquet", label_column="y", metric="logloss", lower_is_better=True)


def _deploy(store: RolloutStore, model: str, gates: rpb.PromotionGates | None) -> None:
    deployment = pb.Deployment(model_name=model, version=1)
    if gates is not None:
        deployment.gates.CopyFrom(gates)
    assert store.put_deployment(StoredDeployment(model, deployment.SerializeToString(), 1, "", "alice", 1), 0)


def test_the_deployment_gates_win_over_the_defaults_and_empty_gates_mean_the_defaults(tmp_path: Path) -> None:
    registry = Registry.open(sqlite_url(tmp_path / "registry.db"))
    try:
        store = RolloutStore(registry.engine)
        _deploy(store, "own", rpb.PromotionGates(backtest=OWN))
        _deploy(store, "empty", rpb.PromotionGates())
        _deploy(store, "latency_only", rpb.PromotionGates(latency=rpb.LatencyGate(p99_budget_ms=5)))
        gate = spec_gate(store, rpb.PromotionGates(backtest=DEFAULT))
        assert gate("own") == OWN
        assert gate("empty") == DEFAULT
        assert gate("never_deployed") == DEFAULT
        assert gate("latency_only") is None, "a deployment's gates replace the defaults, as on promotion"
        assert spec_gate(store, rpb.PromotionGates())("never_deployed") is None
    finally:
        registry.close()


def test_the_budget_names_its_metric_direction_and_limit() -> None:
    with pytest.raises(FailedPrecondition, match=r"backtest\.max_optimization_loss: .* sets no accuracy budget"):
        Budget.of(DEFAULT)
    auc = Budget.of(rpb.BacktestGate(metric="auc", max_optimization_loss=0.01))
    assert (auc.metric, auc.higher_is_better, auc.max_loss) == ("auc", True, 0.01)
    assert auc.loss(0.90, 0.88) == pytest.approx(0.02)
    loss = Budget.of(rpb.BacktestGate(metric="logloss", lower_is_better=True, max_optimization_loss=0.0))
    assert loss.loss(0.30, 0.25) == pytest.approx(-0.05), "lower log-loss is no loss"
    from_threshold = Budget.of(
        rpb.BacktestGate(thresholds=[rpb.MetricThreshold(metric="logloss", max_value=1)], max_optimization_loss=0.1)
    )
    assert (from_threshold.metric, from_threshold.higher_is_better) == ("logloss", False)
    with pytest.raises(FailedPrecondition, match=r"backtest\.metric"):
        Budget.of(rpb.BacktestGate(max_optimization_loss=0.1))
    with pytest.raises(FailedPrecondition, match=r"expected a finite loss >= 0"):
        Budget.of(rpb.BacktestGate(metric="auc", max_optimization_loss=float("nan")))


def test_requests_take_their_defaults_and_refuse_what_does_not_fit() -> None:
    static = OptimizeRequest("m", 1, pb.OPTIMIZATION_METHOD_INT8_STATIC, calibration_uri="s.parquet").checked()
    assert static.calibration_rows == 1000
    assert OptimizeRequest("m", 1, pb.OPTIMIZATION_METHOD_INT8_DYNAMIC).checked().calibration_rows == 0
    with pytest.raises(InvalidArgument, match="calibration_rows"):
        OptimizeRequest("m", 1, pb.OPTIMIZATION_METHOD_INT8_STATIC, "s.parquet", calibration_rows=10**6).checked()
    with pytest.raises(InvalidArgument, match="version"):
        OptimizeRequest("m", 0, pb.OPTIMIZATION_METHOD_INT8_DYNAMIC).checked()
