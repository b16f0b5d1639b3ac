"""devstack's FaultProxy passes a request's path on byte for byte (federation signs it)."""

from __future__ import annotations

import aiohttp
import yarl
from aiohttp import web

from devstack.proxy import FaultProxy

PATH = "/_matrix/federation/v1/send/%21room%3Aexample.org%40x?since=%2Fa"


async def test_the_path_goes_through_as_sent() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.rel_url.raw_path_qs)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    await proxy.start()
    try:
        url = yarl.URL(proxy.url + PATH, encoded=True)
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
    finally:
        await proxy.stop()
        await runner.cleanup()
    assert seen == [PATH]
