"""A server's asyncio loop on its own daemon thread, with a thread pool for blocking work.

Shared by the HTTP/WebSocket server (:mod:`vecswim.server`) and the Postgres wire server
(:mod:`vecswim.pgwire`), which both run beside the engine thread in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor


class LoopThread:
    """``loop`` runs on a daemon thread named ``name``; ``pool`` has ``workers`` threads.

    ``start(setup)`` runs the server's set-up coroutine on the loop and waits for it; if it
    fails, loop, thread and pool are torn down and the error is raised. ``close(stop)`` runs
    ``stop()`` on the loop, cancels every task left (each connection's handler), stops the
    loop and the pool; idempotent, waits at most about 20 s. Creating one lowers the GIL
    switch interval to 0.5 ms (from 5 ms): query threads run Python (encoding rows), and the
    engine thread must get the GIL back quickly from them.
    """

    def __init__(self, name: str, workers: int) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=f"{name}-query")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def start(self, setup: Coroutine) -> None:
        try:
            asyncio.run_coroutine_threadsafe(setup, self.loop).result()
        except BaseException:
            self._halt()
            raise

    def close(self, stop: Callable[[], Coroutine] | None = None) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(stop), self.loop).result(timeout=10)
        self._halt()

    async def _stop(self, stop: Callable[[], Coroutine] | None) -> None:
        if stop is not None:
            await stop()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def _halt(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
