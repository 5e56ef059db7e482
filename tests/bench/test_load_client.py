"""The load generator's HTTP client (bench/load_server.py `Connection`), which bench/peer_server.py
and bench/load_server.py use to drive our server and MLServer: every answer it hands back is
checked against the model there, so its framing must be right — Content-Length and chunked bodies,
keep-alive and `connection: close`, and a clear error when the server breaks off."""
import asyncio
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.load_server import Connection, decode_answer  # noqa: E402

ANSWER = json.dumps({"outputs": [{"name": "y", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()


def _chunked(body: bytes) -> bytes:
    parts = [body[:10], body[10:]]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\nx-trailer: 1\r\n\r\n"


# What the stand-in server answers to the n-th request it reads on a connection.
SCRIPT = [
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER) + ANSWER,
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(ANSWER),
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy",
]


async def _serve(seen: list, cut_short: bool):
    async def handle(reader, writer):
        for answer in SCRIPT:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            seen.append(head + await reader.readexactly(length))
            writer.write(answer[:len(answer) // 2] if cut_short else answer)
            await writer.drain()
            if cut_short or b"connection: close" in answer:
                break
        writer.close()
    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_keep_alive_content_length_chunked_and_close():
    async def main():
        seen = []
        server = await _serve(seen, cut_short=False)
        port = server.sockets[0].getsockname()[1]
        conn = Connection(f"http://127.0.0.1:{port}")
        raw = conn.request("/v2/models/m/infer", b'{"inputs": []}', {"content-type": "application/json"})
        first, second, third = [await conn.send(raw) for _ in range(3)]
        assert conn.writer is None  # `connection: close` was honoured
        again = await conn.send(raw)  # ... and the next request opens a new connection
        server.close()
        return seen, first, second, third, again

    seen, first, second, third, again = asyncio.run(main())
    assert len(seen) == 4
    assert seen[0].startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n") and seen[0].endswith(b'\r\n\r\n{"inputs": []}')
    assert b"content-length: 14\r\n" in seen[0] and b"content-type: application/json\r\n" in seen[0]
    assert (first.status_code, second.status_code, third.status_code, again.status_code) == (200, 200, 503, 200)
    assert first.content == second.content == ANSWER and third.text == "busy"
    np.testing.assert_array_equal(decode_answer(second), np.array([[1, 2, 3]], np.float32))


def test_an_answer_cut_short_is_an_error_and_the_connection_is_dropped():
    async def main():
        server = await _serve([], cut_short=True)
        conn = Connection(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        with pytest.raises(httpx.RemoteProtocolError, match="IncompleteReadError"):
            await conn.send(conn.request("/x", b"{}", {}))
        assert conn.writer is None
        server.close()

    asyncio.run(main())
