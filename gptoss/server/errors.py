"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and pydantic's complaints
about a request body turned into one of them."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel


class APIError(Exception):
    """A request the server refuses, answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The shape of every error answer, for the OpenAPI schema."""

    error: ErrorDetail


# The errors an endpoint may answer, documented in the OpenAPI schema (clients and fuzzers read it).
ERROR_RESPONSES = {status: {"model": ErrorBody, "description": why} for status, why in (
    (400, "a malformed, out-of-range or unsupported request"), (401, "a missing or wrong API key"),
    (404, "an unknown model or stored response"), (413, "a request body over the limit"),
    (429, "the queue is full: try again after Retry-After seconds"), (500, "a failure inside the engine"))}


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's most specific complaint as a 400: OpenAI answers malformed or mistyped bodies with 400."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {errors[0]['ctx']['error']}",
                        code="invalid_json")
    paths = [_path_in_body(e, exc.body) for e in errors]
    worst = max(range(len(errors)), key=lambda i: len(paths[i]))  # the deepest: "input.0", not just "input"
    param = ".".join(paths[worst]) or None
    if errors[worst]["type"] == "extra_forbidden":  # OpenAI's words for a field it does not know
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {errors[worst]['msg']}{more}", param=param, code=errors[worst]["type"])


def _path_in_body(error: dict, body: Any) -> list[str]:
    """The error's location as keys and indices of the body sent, without pydantic's names for union members
    (its loc for a bad `"input": 5` is ("body", "input", "str"))."""
    path, node = [], body
    for key in error["loc"][1:]:
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if in_list or isinstance(node, dict) and key in node:
            path.append(str(key))
            node = node[key]
        elif error["type"] == "missing" and isinstance(node, dict):
            path.append(str(key))
    return path
