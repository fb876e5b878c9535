"""Response bodies as orjson writes them: every float32 the model gives reads back exactly."""

from __future__ import annotations

import json

import numpy as np


def test_response_json_keeps_every_float32_value_exactly() -> None:
    """orjson writes the bodies; whatever its float notation (1e-5 where Python writes 1e-05), every
    value must read back as the float32 the model gave, the extremes of a softmax included."""
    from service.api.rest import json_response

    def dumps(body: dict[str, object]) -> bytes:
        return bytes(json_response(body).body)

    extremes = np.array([0.0, 1.0, 1e-45, 1.17549435e-38, 3.4028235e38, 1 / 3, 0.1, 1e-5, 0.99999994], np.float32)
    values = np.concatenate((extremes, np.random.default_rng(0).random(10_000, np.float32) ** 40))
    body = {"probabilities": values.tolist(), "label": "T-shirt/top", "note": "naïve"}
    assert json.loads(dumps(body)) == body
    assert json.loads(dumps(body)) == json.loads(json.dumps(body))
