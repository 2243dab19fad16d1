"""The FastAPI app: routes of REST API v1 (and their un-versioned aliases), probes and metrics.

HTTP concerns only: body parsing (multipart or JSON), auth, request ids, error shape, request logs and
request metrics. The serving logic lives in `service.gateway`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import schemas
from service.errors import ApiError, error_body, error_response, rejection_reason
from service.gateway import Call, Gateway
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("openset.access")
FieldsT = TypeVar("FieldsT", bound=BaseModel)

TASK_ROUTES = ("segment", "detect", "refer", "caption", "retrieve", "embed")
ALIASES = {f"/{name}": f"/v1/{name}" for name in TASK_ROUTES}
KNOWN_PATHS = {*ALIASES.values(), "/v1/models", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
OFFLOAD_BYTES = 512 * 1024  # larger JSON bodies are parsed and base64-decoded off the event loop
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": description}
    for status, description in {
        400: "Bad input (corrupt image, bad vocabulary, phrase too long, too many items).",
        401: "Missing or wrong API key (when the server requires one).",
        413: "Body larger than the upload limit, or image with too many pixels.",
        415: "Unsupported content type or image format.",
        422: "A field failed validation.",
        429: "Overloaded: the queue is full; retry after the `Retry-After` header.",
        503: "Not ready (loading or shutting down), or the worker died; retry.",
        504: "The request's deadline passed before it was computed.",
    }.items()
}


# -- middleware: request id, upload limit, request metrics and logs --------------------------------


class RequestMiddleware:
    """Pure ASGI middleware (no per-request task): ids, the upload limit, metrics and the access log."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = start
        status = 500
        limit = self.settings.max_upload_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise upload_too_large(limit)
            return message

        try:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                error = upload_too_large(limit)
                state["error_code"] = error.code
                await error_response(error)(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            self.record(scope, state, status, time.perf_counter() - start)

    def record(self, scope: Scope, state: dict, status: int, seconds: float) -> None:
        path = scope["path"]
        endpoint = ALIASES.get(path, path) if path in KNOWN_PATHS or path in ALIASES else "unmatched"
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.request_duration.labels(endpoint).observe(seconds)
        code = state.get("error_code")
        reason = rejection_reason(status, code or "") if code else None
        if reason is not None:
            self.metrics.rejected.labels(reason).inc()
        if endpoint in ("/metrics", "/healthz", "/readyz"):
            return  # probes and scrapes would drown the log
        call: Call | None = state.get("call")
        logger.info(
            "request",
            extra={
                "request_id": state["request_id"],
                "method": scope["method"],
                "endpoint": endpoint,
                "status": status,
                "error_code": code,
                "duration_ms": round(seconds * 1e3, 3),
                "model": self.settings.model,
                "task": call.task if call else None,
                "batch_size": call.batch_size if call else None,
                "timings_ms": call.timings_ms if call else None,
            },
        )


def upload_too_large(limit: int) -> ApiError:
    return ApiError(
        413, "payload_too_large", f"The request body is larger than {limit} bytes; send a smaller image."
    )


# -- body parsing ----------------------------------------------------------------------------------


async def read_payload(
    request: Request, settings: Settings, image_field: str
) -> tuple[dict[str, Any], list[bytes]]:
    """(fields, image bytes) from a JSON or multipart body; the image field is removed from `fields`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = await request.body()
        try:
            data = (
                json.loads(body) if len(body) < OFFLOAD_BYTES else await asyncio.to_thread(json.loads, body)
            )
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"The body is not valid JSON ({exc}).") from None
        if not isinstance(data, dict):
            raise ApiError(422, "validation_error", "The JSON body must be an object.")
        raw = data.pop(image_field, None)
        values = [] if raw is None else raw if isinstance(raw, list) else [raw]
        if len(body) < OFFLOAD_BYTES:
            return data, [decode_base64(value, image_field) for value in values]
        return data, await asyncio.to_thread(lambda: [decode_base64(value, image_field) for value in values])
    if content_type == "multipart/form-data":
        try:
            form = await request.form(
                max_files=settings.max_retrieve_items + 1,
                max_fields=settings.max_vocabulary + settings.max_retrieve_items + 32,
                max_part_size=settings.max_upload_bytes,
            )
        except MultiPartException as exc:
            raise ApiError(
                400, "invalid_multipart", f"The multipart body could not be parsed ({exc.message})."
            ) from None
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        for key, value in form.multi_items():
            if key == image_field:
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "invalid_image", f"`{image_field}` must be a file part.")
                images.append(await value.read())
            elif isinstance(value, UploadFile):
                raise ApiError(400, "invalid_multipart", f"Unexpected file part `{key}`.")
            elif key in fields:
                previous = fields[key]
                fields[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
            else:
                fields[key] = value
        await form.close()
        return fields, images
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content type {content_type or 'none'!r} is not accepted; send multipart/form-data or JSON.",
    )


def decode_base64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, "validation_error", f"`{field}` must be base64 text (or a list of them).")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URL
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"`{field}` is not valid base64.") from None


def parse_fields(model: type[FieldsT], fields: dict[str, Any]) -> FieldsT:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(422, "validation_error", describe_errors(exc.errors())) from None


def describe_errors(errors: Any) -> str:
    parts = []
    for error in list(errors)[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {error.get('msg')}")
    return "; ".join(parts)


def one_image(images: list[bytes]) -> bytes:
    if len(images) != 1:
        raise ApiError(400, "invalid_image", f"Send exactly one image (got {len(images)}).")
    return images[0]


def request_timeout(request: Request, field: float | None) -> float | None:
    """The smaller of the `timeout` field and the `X-Request-Timeout` header (seconds), if any."""
    header = request.headers.get("x-request-timeout")
    values = [field] if field else []
    if header:
        try:
            seconds = float(header)
        except ValueError:
            raise ApiError(400, "invalid_timeout", "X-Request-Timeout must be a number of seconds.") from None
        if seconds <= 0:
            raise ApiError(400, "invalid_timeout", "X-Request-Timeout must be positive.")
        values.append(seconds)
    return min(values) if values else None


# -- the app ---------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    gateway = Gateway(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="OpenSet",
        version="1",
        description=(
            "Open-vocabulary segmentation, referring segmentation, captioning, retrieval and embeddings "
            "with the X-Decoder model family. Every POST takes multipart/form-data (an `image` file plus "
            'fields) or JSON (the image base64 encoded). Errors are `{"error": {"code", "message"}}`. '
            "`POST /segment`, `/refer`, `/caption`, `/retrieve` and `/embed` are aliases of the `/v1` routes."
        ),
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.add_middleware(RequestMiddleware, settings=settings, metrics=metrics)
    install_error_handlers(app)

    bearer = HTTPBearer(auto_error=False, description="Required when the server sets OPENSET_API_KEY.")

    async def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "Missing or wrong API key; send `Authorization: Bearer <key>`.",
                {"WWW-Authenticate": "Bearer"},
            )

    def task_route(
        name: str,
        fields_model: type[BaseModel],
        image_field: str | None,
        response_model: type[BaseModel],
        example: dict,
        run: Callable[[Call, Any, list[bytes]], Awaitable[dict]],
        summary: str,
    ) -> None:
        async def endpoint(request: Request) -> JSONResponse:
            fields, images = await read_payload(request, settings, image_field or "images")
            params = parse_fields(fields_model, fields)
            timeout = request_timeout(request, getattr(params, "timeout", None))
            call = gateway.begin(request.state.request_id, timeout, request.state.started)
            request.state.call = call
            return JSONResponse(await run(call, params, images))

        endpoint.__name__ = name
        responses = {200: {"model": response_model}, **ERROR_RESPONSES}
        extra = schemas.request_body(fields_model, image_field, example)
        dependencies = [Depends(bearer), Depends(require_api_key)]
        app.add_api_route(
            f"/v1/{name}",
            endpoint,
            methods=["POST"],
            summary=summary,
            responses=responses,
            openapi_extra=extra,
            dependencies=dependencies,
            tags=["v1"],
            operation_id=f"v1_{name}",
        )
        app.add_api_route(
            f"/{name}",
            endpoint,
            methods=["POST"],
            summary=f"Alias of POST /v1/{name}",
            description=f"Same as `POST /v1/{name}` (the un-versioned path users were promised).",
            responses=responses,
            openapi_extra=extra,
            dependencies=dependencies,
            tags=["aliases"],
            operation_id=f"alias_{name}",
        )

    image = "<base64 JPEG/PNG>"
    task_route(
        "segment",
        schemas.SegmentFields,
        "image",
        schemas.SegmentResponse,
        {"image": image, "vocabulary": ["person", "dog", "grass"], "task": "panoptic", "stuff": ["grass"]},
        lambda call, params, images: gateway.segment(call, params, one_image(images)),
        "Open-vocabulary panoptic, semantic or instance segmentation",
    )
    task_route(
        "detect",
        schemas.DetectFields,
        "image",
        schemas.DetectResponse,
        {"image": image, "vocabulary": ["person", "dog"], "max_detections": 20},
        lambda call, params, images: gateway.detect(call, params, one_image(images)),
        "Open-vocabulary detection: boxes, labels and scores (models with a box head)",
    )
    task_route(
        "refer",
        schemas.ReferFields,
        "image",
        schemas.ReferResponse,
        {"image": image, "phrase": "the dog on the left", "multi": False},
        lambda call, params, images: gateway.refer(call, params, one_image(images)),
        "Referring segmentation: the region a phrase describes",
    )
    task_route(
        "caption",
        schemas.CaptionFields,
        "image",
        schemas.CaptionResponse,
        {"image": image},
        lambda call, params, images: gateway.caption(call, params, one_image(images)),
        "Image captioning",
    )
    task_route(
        "retrieve",
        schemas.RetrieveFields,
        "images",
        schemas.RetrieveResponse,
        {"images": [image, image], "texts": ["a dog on grass", "a city street"]},
        gateway.retrieve,
        "Image-text retrieval scores and rankings",
    )
    task_route(
        "embed",
        schemas.EmbedFields,
        "images",
        schemas.EmbedResponse,
        {"texts": ["a dog on grass"]},
        gateway.embed,
        "Image or text embeddings",
    )

    @app.get(
        "/v1/models",
        response_model=schemas.ModelsResponse,
        tags=["v1"],
        dependencies=[Depends(bearer), Depends(require_api_key)],
    )
    async def models() -> dict:
        """Loaded models: tasks, runtime, device, input sizes."""
        return gateway.models()

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=schemas.ReadyResponse,
        tags=["probes"],
        responses={503: {"model": schemas.ErrorResponse}},
    )
    async def readyz() -> JSONResponse:
        """Readiness: workers loaded and warmed up, not shutting down."""
        status = {
            "ready": gateway.ready,
            "workers_ready": gateway.pool.ready_count,
            "workers": len(gateway.pool.workers),
            "draining": gateway.draining,
        }
        if gateway.ready:
            return JSONResponse(status)
        body = error_body("not_ready", "Workers are loading or the server is shutting down.")
        return JSONResponse({**body, **status}, status_code=503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics (text format)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, in the `{"error": {"code", "message"}}` shape."""

    def remember(request: Request, code: str) -> None:
        request.state.error_code = code

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        remember(request, exc.code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        remember(request, "validation_error")
        return error_response(ApiError(422, "validation_error", describe_errors(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        remember(request, code)
        message = (
            f"No route {request.method} {request.url.path}." if exc.status_code in codes else str(exc.detail)
        )
        return error_response(ApiError(exc.status_code, code, message, dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("openset.app").exception(
            "unhandled error", extra={"request_id": request.state.request_id}
        )
        remember(request, "internal_error")
        return error_response(
            ApiError(500, "internal_error", "Internal error; the request id is in X-Request-ID.")
        )
