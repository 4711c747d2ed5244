"""Every error in OpenAI's schema, from one place: ``{"error": {"message", "type", "param", "code"}}``.

:class:`ApiError` is what the server's own checks raise; :func:`from_validation` turns
pydantic's (and so FastAPI's) validation errors into the same schema, naming the field
as OpenAI does (``messages[0].content[1].type``); :func:`install` registers the handlers
that answer all of them, FastAPI's ``RequestValidationError`` and HTTP errors included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

__all__ = ["ApiError", "BodyError", "JsonRoute", "bad", "from_validation", "install", "parse_json"]


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------- JSON bodies

class BodyError(StarletteHTTPException):
    """An :class:`ApiError` raised while FastAPI reads a body: FastAPI turns any other
    exception there into a bare 400 but passes HTTP exceptions on (see :func:`install`)."""

    def __init__(self, error: ApiError):
        super().__init__(error.status, error.message)
        self.error = error


THREAD_PARSE_BYTES = 256 * 1024
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes) -> Any:
    """The body's JSON, as Python can hold it faithfully.

    A body that is not JSON raises ``json.JSONDecodeError`` saying why (FastAPI turns it
    into a ``json_invalid`` validation error; any other exception would become a bare
    "error parsing the body"). Valid JSON that Python cannot hold as text and numbers
    raises :class:`BodyError` naming the field: a lone UTF-16 surrogate (``"\\ud800"``: not
    a character, no tokenizer takes it) or an integer of more digits than Python converts
    (``sys.get_int_max_str_digits()``, 4,300).
    """
    try:
        text = raw.decode("utf-8")  # raw UTF-8 cannot hold a surrogate; only a \\u escape can
    except UnicodeDecodeError as err:
        raise json.JSONDecodeError("the body is not UTF-8 encoded", "", err.start) from None
    digits = False
    try:
        try:
            value = json.loads(text)
        except ValueError as err:
            if isinstance(err, json.JSONDecodeError):
                raise
            # an integer of more than 4300 digits: parse again, keeping it aside, to name its field
            value, digits = json.loads(text, parse_int=_int_or_digits), True
    except RecursionError:
        raise json.JSONDecodeError("the body is nested too deeply", text, 0) from None
    if digits or _SURROGATE_ESCAPE.search(text):
        _refuse_unholdable(value)
    return value


class _Digits:
    """An integer literal too long to convert (its digit count)."""

    def __init__(self, literal: str):
        self.n = len(literal.lstrip("-"))


def _int_or_digits(literal: str):
    try:
        return int(literal)
    except ValueError:
        return _Digits(literal)


def _refuse_unholdable(value: Any) -> None:
    """Raise :class:`BodyError` at the first lone surrogate or over-long integer, naming its field."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise BodyError(bad(f"a key of {path or 'the body'} holds a lone UTF-16 surrogate (a \\ud800-"
                                        "\\udfff escape without its pair): not a character", path or None))
                stack.append((f"{path}.{k}" if path else k, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, str) and (m := _SURROGATE.search(v)):
            raise BodyError(bad(f"{_where(path)} holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x} at "
                                f"character {m.start()}, an escape without its pair): not a character", path or None))
        elif isinstance(v, _Digits):
            raise BodyError(bad(f"{_where(path)} is an integer of {v.n} digits; this server reads at most "
                                f"{sys.get_int_max_str_digits()}", path or None))


def _where(path: str) -> str:
    return f"'{path}'" if path else "the body"


# ----------------------------------------------------------------------------- validation errors

_TYPE_CODES = {"missing": "missing", "json_invalid": "invalid_json", "extra_forbidden": "unknown_parameter"}


def _code(kind: str) -> str:
    if kind in _TYPE_CODES:
        return _TYPE_CODES[kind]
    if kind.endswith(("_type", "_parsing")) or kind in ("model_attributes_type", "is_instance_of", "dict_type"):
        return "invalid_type"
    if kind in ("unsupported_value", "invalid_value"):  # our own (PydanticCustomError) codes
        return kind
    return "invalid_value"


def _param(loc: tuple, body: Any) -> Optional[str]:
    """OpenAI-style field path of a pydantic error location, walking the body so that the
    union tags pydantic inserts (``str``, ``list[...]``, ``text``) are left out."""
    path, node = "", body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, str) and (part in node or i == len(loc) - 1):
            # present, or missing (a missing field ends the location; a union tag never does)
            path, node = f"{path}.{part}" if path else part, node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
    return path or None


def from_validation(errors: list[dict], body: Any) -> ApiError:
    """The first of pydantic's ``errors`` as a 400 in OpenAI's schema, naming the field."""
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    loc = loc[1:] if loc[:1] == ("body",) else loc
    kind = err.get("type", "value_error")
    if kind == "json_invalid":
        ctx = err.get("ctx") or {}
        return bad(f"request body is not valid JSON: {ctx.get('error', err.get('msg'))}", None, "invalid_json")
    param = _param(loc, body)
    ctx = err.get("ctx") or {}
    if kind.startswith("union_tag") and param and "discriminator" in ctx:
        param += "." + str(ctx["discriminator"]).strip("'")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return bad(f"request body must be a JSON object (Content-Type: application/json), got "
                   f"{_json_type(body)}", None, "invalid_type")
    message = err.get("msg", "invalid value")
    if kind in ("unsupported_value", "invalid_value"):  # ours: the message names the field already
        return bad(message, param, kind)
    got = f", got {json.dumps(err['input'])[:80]}" if "input" in err and _scalar(err["input"]) else ""
    where = f"'{param}'" if param else "request body"
    message = message[0].lower() + message[1:]
    return bad(f"{where}: {message}{got}", param, _code(kind))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null", bytes: "non-JSON bytes"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- handlers

def install(app: FastAPI, on_error=None) -> None:
    """Answer every error in OpenAI's schema; ``on_error(ApiError)`` sees each one (metrics)."""

    def answer(err: ApiError) -> JSONResponse:
        if on_error is not None:
            on_error(err)
        return err.response()

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return answer(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, err: RequestValidationError):
        return answer(from_validation(list(err.errors()), err.body))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException):
        if isinstance(err, BodyError):
            return answer(err.error)
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return answer(ApiError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal_error(_, err: Exception):
        log.exception("internal error")
        return answer(ApiError(500, f"internal server error: {type(err).__name__}", type="server_error",
                               code="internal_error"))


# ----------------------------------------------------------------------------- JSON route

class _JsonBody(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            # a large body is parsed in a worker thread: the event loop keeps serving the others
            self._json = parse_json(raw) if len(raw) < THREAD_PARSE_BYTES else await asyncio.to_thread(parse_json, raw)
        return self._json


class JsonRoute(APIRoute):
    """FastAPI's route with :func:`parse_json` as its JSON decoder (FastAPI's documented
    custom-``Request`` pattern), so every bad body is a validation error that says why."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_JsonBody(request.scope, request.receive))

        return route
