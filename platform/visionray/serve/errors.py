"""The one error type of the serving path: a request refused on purpose, with its HTTP answer."""

from __future__ import annotations

import json


class Rejection(Exception):
    """A request refused on purpose: HTTP ``status``, a stable machine ``code`` (also the metric's
    reason) and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str, request_id: str) -> bytes:
    return json.dumps({"code": code, "message": message, "request_id": request_id}).encode()
