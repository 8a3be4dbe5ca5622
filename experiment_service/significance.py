"""The statistics settings of an experiment with their defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass

from fresco.api.experiments.v1 import experiment_pb2

DEFAULT_ALPHA = 0.05
DEFAULT_POWER = 0.8
DEFAULT_SRM_P_VALUE = 0.001
DEFAULT_SRM_MIN_DEVIATION = 0.01
# The planned units per arm that tune the confidence sequences when min_units_per_arm is unset (Michelangelo's floor).
DEFAULT_PLANNED_UNITS = 10_000


@dataclass(frozen=True)
class Significance:
    """alpha, power, fixed_horizon, the SRM thresholds and the planned units per arm."""

    alpha: float = DEFAULT_ALPHA
    power: float = DEFAULT_POWER
    fixed_horizon: bool = False
    srm_p_value: float = DEFAULT_SRM_P_VALUE
    srm_min_deviation: float = DEFAULT_SRM_MIN_DEVIATION
    planned_units_per_arm: int = DEFAULT_PLANNED_UNITS

    @classmethod
    def of(cls, experiment: experiment_pb2.Experiment) -> Significance:
        """The experiment's settings, defaults where unset."""
        s = experiment.statistics
        for name, value in (("alpha", s.alpha), ("power", s.power), ("srm_p_value", s.srm_p_value)):
            if not 0 <= value < 1:
                raise ValueError(f"statistics.{name} is {value}, expected a probability in (0, 1) or 0 for the default")
        if s.srm_min_deviation < 0:
            raise ValueError(f"statistics.srm_min_deviation is {s.srm_min_deviation}, expected >= 0")
        return cls(
            alpha=s.alpha or DEFAULT_ALPHA,
            power=s.power or DEFAULT_POWER,
            fixed_horizon=s.fixed_horizon,
            srm_p_value=s.srm_p_value or DEFAULT_SRM_P_VALUE,
            srm_min_deviation=s.srm_min_deviation or DEFAULT_SRM_MIN_DEVIATION,
            planned_units_per_arm=int(experiment.min_units_per_arm) or DEFAULT_PLANNED_UNITS,
        )
