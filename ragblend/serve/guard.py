"""The server's outer layer, as plain ASGI: body caps on the bytes actually read, and a count of every
response by route and status.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`: that one hands the endpoint a `receive` that
never reports the client's disconnect, so a non-streamed answer whose client left ran to its last token
(a 300-token answer held the queue ~20 s after its client gave up at 2 s, and was counted as a 200).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the body is read: FastAPI passes an HTTPException through its body
    parsing, and the app's handler turns it into the 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit:,} bytes")


@dataclass
class Guard:
    app: ASGIApp
    limit: Callable[[str], int]  # the request path -> its body cap in bytes
    count: Callable[[str, int], None]  # (route path or "unmatched", status) of every response
    reject: Callable[[HTTPException], ASGIApp]  # the error response for a refusal made here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, read, status = self.limit(scope["path"]), 0, 500

        async def capped() -> Message:
            """Chunked bodies declare no length: count what arrives, and stop at the cap."""
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise BodyTooLarge(limit)
            return message

        async def noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if _declared_length(scope) > limit:  # refused before a byte of it is read
                await self.reject(BodyTooLarge(limit))(scope, receive, noted)
            else:
                await self.app(scope, capped, noted)
        finally:
            route = scope.get("route")
            self.count(getattr(route, "path", "unmatched"), status)


def _declared_length(scope: Scope) -> int:
    try:
        return int(Headers(scope=scope).get("content-length") or 0)
    except ValueError:
        return 0
