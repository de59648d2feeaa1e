"""The gateway's one error path: a small exception tree, rendered as OpenAI's error JSON.

Exception hierarchy (status code, OpenAI ``type``)::

    GatewayError                        500 server_error
    ├── InvalidRequestError             400 invalid_request_error
    │   ├── UnprocessableRequestError   400 invalid_request_error  (a field's value, in param)
    │   └── PayloadTooLargeError        413 invalid_request_error
    ├── AuthenticationError             401 authentication_error
    ├── PermissionDeniedError           403 permission_error
    ├── NotFoundError                   404 not_found_error
    ├── RateLimitError                  429 rate_limit_error   (Retry-After, x-ratelimit-*)
    ├── DialogLogUnavailableError       503 server_error       (turn not committed: no ack)
    └── UpstreamError                   502 upstream_error     (engine failed or unreachable)
        ├── UpstreamUnavailableError    503 upstream_error     (engine busy / pool exhausted)
        ├── UpstreamTimeoutError        504 upstream_error
        └── UpstreamRejectedError       engine's 4xx passed on  invalid_request_error

Framework exceptions (validation, oversized bodies, unknown routes) are converted into
this tree by ``to_gateway_error`` in ``gateway.app``; anything else becomes a
``GatewayError`` with a generic message. A stack trace never reaches a client.
"""

from __future__ import annotations

import msgspec

from gateway.protocol import ErrorBody, ErrorResponse


class GatewayError(Exception):
    """Base of every error the gateway answers with."""

    status_code = 500
    default_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.default_type
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}

    def to_response(self) -> ErrorResponse:
        """The OpenAI error envelope for this error."""
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def to_json(self) -> bytes:
        """The OpenAI error envelope as JSON bytes."""
        return msgspec.json.encode(self.to_response())

    def to_sse(self) -> bytes:
        """The error as the last events of a stream: one ``data:`` line, then ``[DONE]``."""
        return b"data: " + self.to_json() + b"\n\ndata: [DONE]\n\n"


class InvalidRequestError(GatewayError):
    """The request cannot be read (malformed JSON, bad header, bad query)."""

    status_code = 400
    default_type = "invalid_request_error"


class UnprocessableRequestError(InvalidRequestError):
    """Well-formed JSON whose fields have the wrong type or value (``param`` names it).

    400 like its parent, as OpenAI answers: clients catch ``BadRequestError`` (its SDKs'
    class for 400) for a bad parameter, and a 422 slipped past that.
    """


class PayloadTooLargeError(InvalidRequestError):
    """The body exceeds ``limits.max_body_bytes``."""

    status_code = 413


class AuthenticationError(GatewayError):
    """No, unknown or revoked API key."""

    status_code = 401
    default_type = "authentication_error"


class PermissionDeniedError(GatewayError):
    """A valid key without the role the route needs."""

    status_code = 403
    default_type = "permission_error"


class NotFoundError(GatewayError):
    """Unknown model alias, route or record."""

    status_code = 404
    default_type = "not_found_error"


class RateLimitError(GatewayError):
    """The key's token bucket is empty."""

    status_code = 429
    default_type = "rate_limit_error"


class DialogLogUnavailableError(GatewayError):
    """The turn's row could not be committed, so the reply is not acknowledged."""

    status_code = 503

    def __init__(self, message: str, *, code: str | None = "dialog_log_unavailable") -> None:
        super().__init__(message, code=code)


class UpstreamError(GatewayError):
    """The engine failed, answered garbage or could not be reached."""

    status_code = 502
    default_type = "upstream_error"


class UpstreamUnavailableError(UpstreamError):
    """The engine said it is unavailable, or no pooled connection freed up in time."""

    status_code = 503


class UpstreamTimeoutError(UpstreamError):
    """The engine did not answer within the configured timeouts."""

    status_code = 504


class UpstreamRejectedError(UpstreamError):
    """The engine refused the request as invalid (its 4xx status is passed on)."""

    default_type = "invalid_request_error"
