"""Dynamic batching: requests wait in a queue on the event loop and leave it together, up to
`max_batch` rows or once the oldest has waited `max_delay` seconds, as one call of `run_batch` on a
worker thread. The event loop keeps accepting and parsing requests while a batch runs.

A partial batch waits only while another request is on its way (inside `arriving()`: its body being
read, parsed, tokenized): with nobody to wait for, it runs at once. A lone client thus pays no
`max_delay` per request, and requests that come while a batch runs still merge into the next one.

`run_batch(items) -> list` returns one result per item, in order; an entry that is an Exception is
raised to that item's caller alone.
"""
from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable


class QueueFull(Exception):
    """The queue already holds `max_queue` requests; the caller should answer 503."""


@dataclass(eq=False)  # identity, not field, comparison: items may hold arrays
class _Pending:
    item: Any
    rows: int
    future: asyncio.Future
    enqueued: float  # loop.time() at submit


class Arrival:
    """A request on its way to `Batcher.submit`; `done()` (idempotent) when it is queued or gave up."""

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        batcher._arriving += 1

    def done(self) -> None:
        if self._batcher is not None:
            self._batcher._arriving -= 1
            self._batcher._wakeup.set()  # a batch held for this request may now be complete
            self._batcher = None


class Batcher:
    def __init__(self, run_batch: Callable[[list], list], *, max_batch: int, max_delay_s: float,
                 max_queue: int = 1024, on_batch: Callable[[int, int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None, name: str = "model"):
        if max_batch < 1 or max_delay_s < 0 or max_queue < 1:
            raise ValueError(f"Batcher: need max_batch >= 1, max_delay_s >= 0, max_queue >= 1; got "
                             f"{max_batch}, {max_delay_s}, {max_queue}")
        self.run_batch, self.max_batch, self.max_delay_s, self.max_queue = (
            run_batch, max_batch, max_delay_s, max_queue)
        self.on_batch = on_batch or (lambda rows, requests: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._arriving = 0  # open Arrivals
        self._wakeup: asyncio.Event | None = None
        self._draining = False  # set on shutdown: stop waiting for more rows, run what is queued
        self._closed = False
        self._task: asyncio.Task | None = None
        # One thread: batches run one after another, each using torch's intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    @contextmanager
    def arriving(self):
        """Around a request's work before `submit` (reading, parsing): yields the Arrival to pass to
        `submit`; a partial batch waits for it (at most max_delay)."""
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.done()

    async def submit(self, item, rows: int, arrival: Arrival | None = None):
        """Queue one request of `rows` rows (ending its `arrival`) and wait for its result (cancel-safe)."""
        if arrival is not None:
            arrival.done()
        if self._closed:
            raise QueueFull("the server is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests already queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, rows, loop.create_future(), loop.time())
        self._queue.append(pending)
        self._queued_rows += rows
        self.on_depth(len(self._queue))
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller gave up (timeout, disconnect): free its queue slot unless it already ran.
            if pending in self._queue:
                self._queue.remove(pending)
                self._queued_rows -= rows
                self.on_depth(len(self._queue))
            raise

    def drain(self) -> None:
        """Stop holding requests back for more rows: run everything queued now (shutdown)."""
        self._draining = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Run what is still queued, then stop the worker and its thread."""
        self._closed = True
        self.drain()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Hold the batch open until it is full, nobody else is arriving, or the oldest request
            # has waited max_delay.
            deadline = self._queue[0].enqueued + self.max_delay_s
            while self._queued_rows < self.max_batch and self._arriving and not self._draining:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            self.on_depth(len(self._queue))
            if not batch:
                continue
            self.on_batch(sum(p.rows for p in batch), len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch,
                                                     [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # never let one batch kill the worker
                results = [exc] * len(batch)
            for pending, result in zip(batch, results):
                if pending.future.done():  # the caller gave up (timeout / disconnect)
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _take(self) -> list[_Pending]:
        """Pop queued requests up to max_batch rows (always at least one, however large)."""
        batch, rows = [], 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled while waiting: drop it
                self._queue.popleft()
                self._queued_rows -= head.rows
                continue
            if batch and rows + head.rows > self.max_batch:
                break
            self._queue.popleft()
            self._queued_rows -= head.rows
            batch.append(head)
            rows += head.rows
        return batch

    @property
    def depth(self) -> int:
        return len(self._queue)
