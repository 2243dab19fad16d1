"""The one error shape of the API: `{"error": {"code": "<snake_case>", "message": "<what, how to fix>"}}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered to the client with `status` and the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.code, error.message), status_code=error.status, headers=error.headers
    )


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


# Rejection reasons of `openset_rejected_total`, by the status that answers them.
REJECTION_REASONS: dict[int, str] = {
    400: "invalid",
    413: "invalid",
    415: "invalid",
    422: "invalid",
    429: "queue_full",
    504: "deadline",
}


def rejection_reason(status: int, code: str) -> str | None:
    """The `reason` label for a rejected request, or None when the answer is not a rejection."""
    if status == 503:
        return "not_ready" if code == "not_ready" else None
    return REJECTION_REASONS.get(status)
