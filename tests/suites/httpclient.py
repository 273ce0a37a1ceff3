"""A blocking HTTP/1.1 client that sends exactly the bytes it is given (invalid UTF-8,
wrong content types, no body), so the suites can say anything a hostile client can."""

from __future__ import annotations

import http.client
import json
from typing import Any

TIMEOUT_S = 120.0


def send(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """(status, content type, whole body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def send_json(port: int, method: str, path: str, body: Any, *, key: str) -> tuple[int, str, bytes]:
    return send(port, method, path, json.dumps(body).encode(),
                {"content-type": "application/json", "authorization": f"Bearer {key}"})
