"""A small fault-injecting reverse proxy for the real-stack tests.

Put it between a client (maubot, say) and the server it talks to (Synapse), then delay or
fail chosen requests::

    proxy = FaultProxy(synapse.url)
    await proxy.start()                      # listens on 127.0.0.1, a free port
    deployment = await deploy(..., homeserver_url=proxy.url)
    proxy.delay_s = 0.5                      # every request waits 0.5 s first ...
    proxy.delay_path = r"/send/"             # ... or only those whose path matches
    fault = proxy.fail(r"/rooms/!abc:hs/state$", 500)           # until cleared
    proxy.fail(r"/sync$", 502, times=3)      # the next 3 matching requests only
    ...                                      # fault.hits: how many it has answered
    proxy.clear()                            # no faults, no delay
    await proxy.stop()

Paths are matched with ``re.search`` against the request's *decoded* path, without the query
string (``/_matrix/client/v3/rooms/!abc:hs/state``), so ``re.escape(room_id)`` works. Every
other request is forwarded unchanged (method, headers, body; the response's status, headers
and body come back as they are, compressed or not). The first matching fault with answers
left wins; a delay applies before forwarding or failing. When the target can't be reached the
proxy answers 502 itself.

The proxy serves from a thread of its own (its own event loop): a test that blocks its loop
(``Deployment.wait_for_log`` polls with ``time.sleep``) does not stall the client behind the
proxy. Its settings may be changed from the test's thread at any time (under a lock).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

# Connection-level headers: never forwarded (RFC 9110 §7.6.1), plus the ones aiohttp sets
# itself for the new connection or body.
_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip
MAX_BODY = 512 * 1024 * 1024  # uploads pass through whole; aiohttp's default is 1 MiB


@dataclass
class Fault:
    """One injected answer: ``status`` for requests whose path matches ``pattern``."""

    pattern: re.Pattern[str]
    status: int
    remaining: int | None  # None: until cleared
    method: str | None = None  # only this method (upper case); None: any
    body: dict = field(default_factory=dict)
    hits: int = 0  # answers given so far

    def takes(self, method: str, path: str) -> bool:
        if self.remaining == 0 or (self.method and self.method != method):
            return False
        return self.pattern.search(path) is not None


class FaultProxy:
    """Forwards every request to ``target_url``; delays and fails the chosen ones."""

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url.rstrip("/")
        self.delay_s: float = 0.0
        self.delay_path: str | None = None  # a regex: only matching paths wait; None: all
        self.faults: list[Fault] = []
        self.forwarded = 0  # requests passed to the target
        self.url = ""
        self._lock = threading.Lock()  # faults are set from the test's thread, taken in ours
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        """Starts serving on 127.0.0.1 (a free port) in its own thread; returns ``self.url``."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        caller = asyncio.get_running_loop()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                url = loop.run_until_complete(self._serve())
            except BaseException as e:  # handed to the caller
                caller.call_soon_threadsafe(ready.set_exception, e)
                loop.run_until_complete(self._shut())
                loop.close()
                return
            caller.call_soon_threadsafe(ready.set_result, url)
            loop.run_forever()  # until stop(), which shuts the server down first
            loop.run_until_complete(_cancel_the_rest())
            loop.close()

        self._thread = threading.Thread(target=serve, name="FaultProxy", daemon=True)
        self._thread.start()
        self.url = await ready
        return self.url

    async def _serve(self) -> str:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        )
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A request under way (a 30 s long poll) does not hold up stop().
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _shut(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def stop(self) -> None:
        """Stops serving (requests under way are cut) and ends the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._shut(), loop))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            self._thread = self._loop = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def fail(
        self,
        path_regex: str,
        status: int,
        times: int | None = None,
        *,
        method: str | None = None,
        body: dict | None = None,
    ) -> Fault:
        """Answers ``status`` (with a Matrix error body, or ``body``) to requests whose path
        matches: the next ``times`` of them, or all until ``clear()`` when None."""
        if times is not None and times < 0:
            raise ValueError("times must be None or >= 0")
        error = body if body is not None else {"errcode": "M_UNKNOWN", "error": "FaultProxy"}
        fault = Fault(re.compile(path_regex), status, times, method and method.upper(), error)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """No faults and no delay from now on (requests already waiting keep their fate)."""
        with self._lock:
            self.faults.clear()
            self.delay_s = 0.0
            self.delay_path = None

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.takes(method, path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    fault.hits += 1
                    return fault
        return None

    def _delay_for(self, path: str) -> float:
        with self._lock:
            delay, only = self.delay_s, self.delay_path
        if delay <= 0 or (only is not None and re.search(only, path) is None):
            return 0.0
        return delay

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        delay = self._delay_for(request.path)
        if delay:
            await asyncio.sleep(delay)
        fault = self._fault_for(request.method, request.path)
        if fault is not None:
            return web.Response(
                status=fault.status, text=json.dumps(fault.body), content_type="application/json"
            )
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None, "FaultProxy.start() was not awaited"
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        body = await request.read()
        self.forwarded += 1
        try:
            async with self._session.request(
                request.method,
                # As sent, byte for byte: re-encoding (%21 -> !) would break what is signed
                # over the exact path (federation requests).
                yarl.URL(self.target_url + request.rel_url.raw_path_qs, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as upstream:
                data = await upstream.read()
                out = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP
                )
                return web.Response(status=upstream.status, body=data, headers=out)
        except aiohttp.ClientError as e:
            return web.Response(status=502, text=f"FaultProxy: target unreachable: {e}")


async def _cancel_the_rest() -> None:
    """Ends what still runs on the proxy's loop (a request cut by stop()) before it closes."""
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
