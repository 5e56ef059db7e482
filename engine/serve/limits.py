"""What bounds the server in aggregate, below and beside the routes.

- `Settings`: every serve limit, in the units the code uses (seconds, bytes), with the defaults the
  command line documents.
- `ByteBudget`: bytes held across in-flight requests (request bodies, predicted answers); past it a
  request is answered 503 with Retry-After instead of growing the process.
- `guarded_protocol(...)`: uvicorn's h11 protocol with a connection cap and a header-read timeout.
  uvicorn times out an idle keep-alive connection only after a response, and cancels that timer on
  any byte received: a client that connects and sends nothing, or trickles its headers a byte at a
  time, holds its connection forever. Here a connection has `header_timeout_s` from its start (and
  from each response) to deliver complete request headers, or it is closed.
"""
from __future__ import annotations

import json
import logging
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("engine.server")
MB = 1 << 20


class Settings:
    """The serve limits (see `sparse-engine serve --help` for each)."""

    def __init__(self, *, max_batch=32, max_delay_ms=5.0, max_body_mb=16.0, max_rows=1024,
                 max_queue=1024, timeout_s=30.0, token=None, max_response_mb=64.0,
                 max_buffered_mb=256.0, max_connections=256, header_timeout_s=10.0, body_timeout_s=30.0):
        self.max_batch, self.max_delay_s = int(max_batch), float(max_delay_ms) / 1000.0
        self.max_body = int(float(max_body_mb) * MB)
        self.max_rows, self.max_queue = int(max_rows), int(max_queue)
        self.timeout_s, self.token = float(timeout_s), token
        self.max_response = int(float(max_response_mb) * MB)
        self.max_buffered = int(float(max_buffered_mb) * MB)
        self.max_connections = int(max_connections)
        self.header_timeout_s, self.body_timeout_s = float(header_timeout_s), float(body_timeout_s)


class BudgetExceeded(Exception):
    """Taking these bytes would pass the budget; the caller answers 503 with Retry-After."""


class ByteBudget:
    """Bytes reserved by in-flight requests; used on the event loop only (no lock needed)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise BudgetExceeded(f"in-flight requests already hold {self.used} bytes; {n} more would pass "
                                 f"the limit of {self.limit} (--max-buffered-mb)")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"retry-after: 1\r\nconnection: close\r\n\r\n").encode() + body


def guarded_protocol(*, max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn's `http=`) enforcing the two limits."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # Headers and body leave in two writes: with Nagle on, the body waits for the client's
                # delayed ACK (~40 ms) on every keep-alive request.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self.connections) > max_connections:
                log.warning("connection refused: %d open connections (limit %d, --max-connections)",
                            len(self.connections) - 1, max_connections)
                transport.write(_raw_response("503 Service Unavailable", f"too many open connections "
                                              f"(limit {max_connections}); retry shortly"))
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same time

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._on_header_timeout)

        def _on_header_timeout(self) -> None:
            # Waiting for headers = no request yet, or the last one answered and no next one begun.
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request headers in %g s", header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol
