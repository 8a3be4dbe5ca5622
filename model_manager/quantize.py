"""INT8 quantisation of an ONNX model with ONNX Runtime's quantisation tools: dynamic (weights stored as INT8,
activations quantised on the fly) or static (activation ranges calibrated on sample rows, QDQ format).

Blocking and CPU-heavy: callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)

CALIBRATION_BATCH_ROWS = 64


class QuantizationError(Exception):
    """ONNX Runtime could not quantise the model."""


class CalibrationRows(CalibrationDataReader):  # type: ignore[misc]
    """Calibration batches of one input, as ONNX Runtime's static quantisation reads them."""

    def __init__(self, input_name: str, rows: npt.NDArray[np.generic], batch_rows: int = CALIBRATION_BATCH_ROWS):
        self._batches: Iterator[dict[str, npt.NDArray[np.generic]]] = iter(
            [{input_name: rows[i : i + batch_rows]} for i in range(0, rows.shape[0], batch_rows)]
        )

    def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
        """The next batch, None after the last."""
        return next(self._batches, None)


def _prepared(source: Path, target: Path) -> Path:
    """The model after the shape inference of ONNX Runtime's pre-processing, which quantisation recommends; the model
    as it is when that fails. Not its graph optimisation: static per-channel quantisation fails on the Gemm nodes it
    fuses (onnxruntime 1.31, bias scale adjustment)."""
    try:
        quant_pre_process(str(source), str(target), skip_optimization=True, skip_symbolic_shape=True)
    except Exception as err:  # noqa: BLE001 - pre-processing improves the result, never a reason to fail
        log.warning("quantisation pre-processing skipped: %s", str(err)[:300])
        return source
    return target


def quantize_int8(artifact: bytes, input_name: str = "", calibration: npt.NDArray[np.generic] | None = None) -> bytes:
    """The model quantised to INT8: static with activation ranges from `calibration` rows of `input_name` when given,
    else dynamic. Weights are signed INT8 (per channel when static), activations unsigned INT8."""
    with tempfile.TemporaryDirectory(prefix="fresco-int8-") as scratch:
        folder = Path(scratch)
        source = folder / "model.onnx"
        source.write_bytes(artifact)
        prepared = _prepared(source, folder / "prepared.onnx")
        target = folder / "int8.onnx"
        try:
            if calibration is None:
                quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
            else:
                quantize_static(
                    prepared,
                    target,
                    CalibrationRows(input_name, calibration),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                )
        except Exception as err:  # ONNX Runtime raises assorted types for graphs it cannot quantise
            raise QuantizationError(f"ONNX Runtime cannot quantise the model: {str(err)[:300]}") from err
        return target.read_bytes()
