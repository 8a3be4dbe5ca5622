"""Plain HTTP calls to a predictor's REST endpoint (KServe v2), and checks of the tensors it answers."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.parse
from typing import Any

import numpy as np


class Http:
    """Plain HTTP calls to a predictor's REST endpoint, on one kept-alive connection."""

    def __init__(self, url: str) -> None:
        self.url = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=60)

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of one call."""
        self.connection.request(method, path, body=body, headers=headers or {})
        reply = self.connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()

    def json(self, method: str, path: str, document: object = None, **headers: str) -> tuple[int, Any]:
        """Status and parsed JSON body (None when empty)."""
        body = None if document is None else json.dumps(document).encode()
        status, _, data = self.call(method, path, body, {"Content-Type": "application/json", **headers})
        return status, json.loads(data) if data else None

    def close(self) -> None:
        self.connection.close()


def infer_body(rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A JSON inference request for the demo model."""
    return {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(rows.shape), "data": rows.tolist()}], **extra}


def exact(output: dict[str, Any], expected: np.ndarray) -> None:
    """An output of the probe's report holds exactly the expected array (bit for bit)."""
    assert output["shape"] == list(expected.shape)
    assert base64.b64decode(output["data"]) == np.ascontiguousarray(expected).tobytes(), output


def exact_json(output: dict[str, Any], expected: np.ndarray) -> None:
    """A JSON output holds exactly the expected values (floats parsed back to the same float32)."""
    assert output["shape"] == list(expected.shape)
    np.testing.assert_array_equal(np.array(output["data"], dtype=expected.dtype).reshape(expected.shape), expected)
    assert np.array(output["data"], dtype=expected.dtype).tobytes() == expected.tobytes()
