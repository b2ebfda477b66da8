"""The error a client sees as ``{"message", "reason"}``, raised by handlers and the gateway alike."""

from __future__ import annotations

from tornado import web


class ApiError(web.HTTPError):
    """An error a client sees as ``{"message", "reason"}`` with an HTTP status."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(status, message)
        self.message = message
        self.error_reason = reason
