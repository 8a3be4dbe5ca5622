"""Per-arm sufficient statistics of one metric: everything the tests need, in sums that add across replicas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SufficientStats:
    """n units with value x (a RATIO's numerator) and y (a RATIO's denominator, or the CUPED covariate).

    Every exposed unit counts, a unit without outcomes with x = 0; a unit without pre-exposure data has y = 0
    and is not counted in n_y.
    """

    n: int = 0
    sx: float = 0.0
    sxx: float = 0.0
    sy: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0
    n_y: int = 0

    def __add__(self, other: SufficientStats) -> SufficientStats:
        return SufficientStats(
            n=self.n + other.n,
            sx=self.sx + other.sx,
            sxx=self.sxx + other.sxx,
            sy=self.sy + other.sy,
            syy=self.syy + other.syy,
            sxy=self.sxy + other.sxy,
            n_y=self.n_y + other.n_y,
        )

    @classmethod
    def from_values(cls, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> SufficientStats:
        """The statistics of per-unit values; a NaN y marks a unit without a covariate (it counts as y = 0)."""
        xs = np.asarray(x, dtype=np.float64).ravel()
        if y is None:
            ys = np.zeros_like(xs)
            n_y = 0
        else:
            ys = np.asarray(y, dtype=np.float64).ravel()
            if ys.shape != xs.shape:
                raise ValueError(f"y has {ys.size} values for {xs.size} units")
            present = ~np.isnan(ys)
            n_y = int(present.sum())
            ys = np.where(present, ys, 0.0)
        return cls(
            n=int(xs.size),
            sx=float(xs.sum()),
            sxx=float(xs @ xs),
            sy=float(ys.sum()),
            syy=float(ys @ ys),
            sxy=float(xs @ ys),
            n_y=n_y,
        )

    def with_units(self, units: int) -> SufficientStats:
        """The same statistics over at least `units` units: exposed units without any outcome add zeros."""
        if units <= self.n:
            return self
        return SufficientStats(units, self.sx, self.sxx, self.sy, self.syy, self.sxy, self.n_y)
