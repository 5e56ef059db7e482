"""What bounds the server in aggregate, below and beside the routes.

- `Settings`: every serve limit, in the units the code uses (seconds, bytes), with the defaults the
  command line documents.
- `ByteBudget`: bytes held across in-flight requests (request bodies, predicted answers); past it a
  request is answered 503 with Retry-After instead of growing the process.
- `guarded_protocol(...)`: uvicorn's httptools protocol (the C parser: pure-Python h11 was 40 % of the
  server's CPU per small request) with a connection cap and a header-read timeout.
  uvicorn times out an idle keep-alive connection only after a response, and cancels that timer on
  any byte received: a client that connects and sends nothing, or trickles its headers a byte at a
  time, holds its connection forever. Here a connection has `header_timeout_s` from its start (and
  from each response) to deliver complete request headers, or it is closed.
"""
from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("engine.server")
MB = 1 << 20
# Requests above this are parsed off the event loop so one large request does not stall the others.
PARSE_IN_THREAD_BYTES = 1 << 20
# Answers whose arrays hold more bytes than this are encoded off the event loop too.
ENCODE_IN_THREAD_BYTES = 1 << 14


# Every serve limit: flag name -> (type, default, help). The command line, its --help and
# Settings' defaults all read this table. Each must be > 0, except max_delay_ms (>= 0).
LIMITS: dict[str, tuple[type, float, str]] = {
    "max_batch": (int, 32, "rows merged into one batch"),
    "max_delay_ms": (float, 5.0, "longest a request waits for others to join its batch (it waits only "
                                 "while another request is being received or parsed)"),
    "max_body_mb": (float, 16.0, "request body limit"),
    "max_rows": (int, 1024, "rows allowed in one request"),
    "max_queue": (int, 1024, "queued requests per model before answering 503"),
    "timeout_s": (float, 30.0, "per-request limit from body read to answer; 504 past it"),
    "max_response_mb": (float, 64.0, "largest answer (JSON or binary); a request whose answer would pass it is "
                                     "refused with 413 before the model runs"),
    "max_buffered_mb": (float, 256.0, "bytes held across all in-flight requests (bodies and predicted "
                                      "answers); past it 503 with Retry-After"),
    "max_connections": (int, 256, "open connections; one more is answered 503 and closed"),
    "header_timeout_s": (float, 10.0, "time a connection has to send complete request headers, from its "
                                      "start or its last answer; then it is closed"),
    "body_timeout_s": (float, 30.0, "time to receive a request body once its headers arrived; 408 past it"),
}


def read_token(path) -> str:
    """The bearer token in a --token-file (surrounding whitespace stripped); an empty file is an error."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"--token-file {path} is empty")
    return token


class Settings:
    """The serve limits (LIMITS, in the units the command line takes) in the units the code uses
    (seconds, bytes), checked; `token` is the bearer token clients must send (None: no auth)."""

    def __init__(self, token: str | None = None, **limits):
        unknown = sorted(set(limits) - set(LIMITS))
        if unknown:
            raise TypeError(f"Settings: unknown limit(s) {unknown}; expected some of {sorted(LIMITS)}")
        v = {name: typ(limits.get(name, default)) for name, (typ, default, _) in LIMITS.items()}
        for name, value in v.items():
            if value < 0 or (value == 0 and name != "max_delay_ms"):
                raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'max_delay_ms' else '> 0'}, "
                                 f"got {value}")
        self.token = token
        self.max_batch, self.max_delay_s = v["max_batch"], v["max_delay_ms"] / 1000.0
        self.max_body, self.max_response = int(v["max_body_mb"] * MB), int(v["max_response_mb"] * MB)
        self.max_buffered = int(v["max_buffered_mb"] * MB)
        self.max_rows, self.max_queue, self.max_connections = v["max_rows"], v["max_queue"], v["max_connections"]
        self.timeout_s, self.header_timeout_s, self.body_timeout_s = v["timeout_s"], v["header_timeout_s"], v["body_timeout_s"]


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


def guarded_protocol(*, max_connections: int, header_timeout_s: float) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol class (uvicorn's `http=`) enforcing the two limits."""

    class GuardedProtocol(HttpToolsProtocol):
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

    return GuardedProtocol
