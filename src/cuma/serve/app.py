"""HTTP routes of ``cuma serve`` (FastAPI). Thin: read and check the body, hand it to :mod:`cuma.serve.serving`,
answer. The model is never touched here; the engine's worker owns it.

Routes: ``GET /health``, ``GET /info``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/choice``,
``GET /`` (the playground) and ``/static/*``. Every error is an OpenAI error object with its status code; nothing
raised while handling a request reaches the client as a traceback.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..profiles import FIELD_LABELS, PROFILE_FIELDS
from .protocol import APIError, ChatCompletionRequest, ChoiceRequest, error_body, parse_request
from .serving import Limits, run_chat, run_choice

logger = logging.getLogger("cuma.serve")

STATIC = Path(__file__).parent / "static"
_DRAIN_CAP = 16 << 20  # read at most this much of an oversized body before answering 413

__all__ = ["create_app"]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it is longer than ``limit`` bytes (what was declared or what arrived)."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)", code="body_too_large")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_header") from None
        if size > limit:
            await _drain(request)
            raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            await _drain(request, size)
            raise too_big
        parts.append(part)
    return b"".join(parts)


async def _drain(request: Request, seen: int = 0) -> None:
    """Read (and drop) the rest of an oversized body, up to a cap, so that the client gets to read our 413."""
    try:
        async for part in request.stream():
            seen += len(part)
            if seen > _DRAIN_CAP:
                break
    except Exception:  # noqa: BLE001 - the stream may already be consumed or the client gone
        pass


def create_app(served, engine, *, api_key: Optional[str] = None, limits: Optional[Limits] = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="cuma serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.state.engine = engine

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send Authorization: Bearer <key>", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != served.name:
            raise APIError(404, f"model: the model {name!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
                   f"{request.url.path}"}.get(err.status_code, str(err.detail))
        return JSONResponse(error_body(err.status_code, message, code=None), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, "invalid request"), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        logger.exception("cuma serve: unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal server error ({type(err).__name__})"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        body = {"status": "ok" if ok else "unavailable", "model": served.name, **engine.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        """What the playground needs: the served model, whether it needs a profile, the profile fields, limits."""
        return {
            **served.info,
            "model": served.name,
            "auth_required": bool(api_key),
            "profile_fields": [{"name": n, "label": FIELD_LABELS[n]} for n in PROFILE_FIELDS],
            "max_tokens_limit": limits.max_tokens_limit,
            "max_batch_size": engine.max_batch_size,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [
            {"id": served.name, "object": "model", "created": 0, "owned_by": "cuma",
             "method": served.method, "uses_profile": served.uses_profile,
             "max_model_len": served.context_length},
        ]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        authorize(request)
        req = parse_request(ChatCompletionRequest, await _read_body(request, limits.max_body_bytes))
        check_model(req.model)
        result = await run_chat(served, engine, req, limits, request)
        if result is None:  # the client went away
            return Response(status_code=499)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/choice")
    async def choice(request: Request) -> Any:
        authorize(request)
        req = parse_request(ChoiceRequest, await _read_body(request, limits.max_body_bytes))
        check_model(req.model)
        result = await run_choice(served, engine, req, request)
        if result is None:
            return Response(status_code=499)
        return JSONResponse(result)

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
