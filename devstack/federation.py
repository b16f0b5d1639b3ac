"""Two homeservers federating on 127.0.0.1 (FACTS.md): the bot's (``home``) and a ``remote``
one, named ``localhost:<tls port>``, each whitelisting the other.

In the tests the home server's federation port, as the remote server reaches it, is a
``DelayFront`` (TLS there, then the home server's plain federation listener), so a test can
slow federation down on purpose (``pair.front.delay_s = 1.5``: each request to the home server
and each of its answers wait that long)::

    pair = start_pair(state_dir)        # home behind a DelayFront, remote direct
    pair.front.delay_s = 1.5            # every request to home and its answer wait 1.5 s
    ...
    stop_pair(pair)
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import urllib.error
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .matrix import MatrixUser
from .procs import free_port
from .synapse import Federation, Synapse

T = TypeVar("T")
PIPE_CHUNK = 64 * 1024


class DelayFront:
    """A homeserver's federation port as its peers see it: TLS (the homeserver's self-signed
    certificate) on ``port``, each connection's bytes piped unchanged to the homeserver's plain
    federation listener at ``target_port``; while ``delay_s`` is set, every request waits that
    long before it goes on, and its answer too (a slow link: a round trip takes twice that).

    Bytes, not requests: federation requests are signed over their exact path, which an HTTP
    proxy that re-encodes it (``devstack.proxy.FaultProxy`` turns ``%40`` into ``@``) breaks.
    It runs an event loop on a thread of its own, so a test that blocks its own loop (a
    ``Deployment.wait_for_log``, a registration over urllib) never holds federation up;
    ``delay_s`` may be set from the test's thread at any time."""

    def __init__(self, port: int, target_port: int, certificate: Path, key: Path) -> None:
        self.port = port
        self.target_port = target_port
        self.delay_s = 0.0
        self.requests = 0  # passed on so far (a peer's bytes after an answer: one request)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(certificate, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"federation-front-{port}", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._tls
        )

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):  # kept-alive peer connections too
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One peer connection: its bytes, decrypted, to the homeserver and back."""
        self._open.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._open.discard(writer)
            writer.close()
            return
        self._open.add(up_writer)
        turn = _Turn()
        await asyncio.gather(
            self._pipe(reader, up_writer, turn, request=True),
            self._pipe(up_reader, writer, turn, request=False),
        )
        self._open.difference_update((writer, up_writer))

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        turn: _Turn,
        request: bool,
    ) -> None:
        """Copies one way until either side is done, then closes ``writer`` (which ends the
        other way too). The first bytes of each request and of each answer wait ``delay_s``."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(PIPE_CHUNK):
                if turn.request_last != request:  # a new request, or its answer
                    turn.request_last = request
                    self.requests += request
                    if self.delay_s > 0:
                        await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        writer.close()


@dataclass
class _Turn:
    """One connection: whether the peer spoke last (so its next bytes are a new request and
    the server's next ones its answer)."""

    request_last: bool = False


@dataclass
class FederatedPair:
    """The bot's homeserver and a remote one, federating; ``front`` is the home server's
    federation port when it is delayed (``start_pair(delayed=True)``), else None."""

    home: Synapse
    remote: Synapse
    front: DelayFront | None = None


def pair_servers(
    state: Path,
    home_port: int | None = None,
    remote_port: int | None = None,
    home_federation_port: int | None = None,
    remote_federation_port: int | None = None,
    delayed: bool = False,
) -> FederatedPair:
    """The two servers' configuration (nothing started): free ports where none is given; with
    ``delayed``, the home server's public federation port is a ``DelayFront``'s."""
    home_public = home_federation_port or free_port()
    remote_public = remote_federation_port or free_port()
    home_name, remote_name = f"localhost:{home_public}", f"localhost:{remote_public}"
    home_listen = free_port() if delayed else home_public
    home = Synapse(
        state / "home", home_port, federation=Federation(home_public, home_listen, (remote_name,))
    )
    remote = Synapse(
        state / "remote",
        remote_port,
        federation=Federation(remote_public, remote_public, (home_name,)),
    )
    return FederatedPair(home, remote)


def start_pair(state: Path, delayed: bool = True, **ports: int | None) -> FederatedPair:
    """Both servers started (``pair_servers``), the home one behind a ``DelayFront`` with
    ``delayed``; never half-started (what started is stopped again on a failure)."""
    pair = pair_servers(state, delayed=delayed, **ports)
    try:
        pair.home.start()
        if delayed:
            fed = pair.home.federation
            assert fed is not None
            pair.front = DelayFront(
                fed.public_port, fed.listen_port, pair.home.certificate, pair.home.certificate_key
            )
            pair.front.start()
        pair.remote.start()
        introduce(pair)
    except BaseException:
        stop_pair(pair)
        raise
    return pair


def introduce(pair: FederatedPair) -> None:
    """Each server fetches the other's signing key (a profile lookup each way), as servers
    that have federated before hold it: from here on a request between them is verified at
    once. (A first key fetch, slowed down by the ``DelayFront``, would hide the invite race of
    FACTS.md behind its own delay.)"""
    home = pair.home.sign_in("introducer", "introducer")
    remote = pair.remote.sign_in("introducer", "introducer")
    for server, login, other in ((pair.home, home, remote), (pair.remote, remote, home)):
        path = f"/_matrix/client/v3/profile/{quote(other['user_id'])}"
        try:
            server.get(path, login["access_token"])
        except urllib.error.HTTPError as e:
            if e.code != 404:  # 404: no profile; the other server answered all the same
                raise


def stop_pair(pair: FederatedPair) -> None:
    pair.remote.stop()
    if pair.front is not None:
        pair.front.stop()
    pair.home.stop()


async def sign_up(
    synapse: Synapse, localpart: str, password: str = "password", e2e: bool = False
) -> MatrixUser:
    """A new user of ``synapse`` (either server of a pair), logged in: a ``MatrixUser``, or with
    ``e2e`` an ``E2EUser`` with its own encrypting device. The caller closes it."""
    user_id = synapse.register(localpart, password)
    if e2e:
        from .e2e import E2EUser  # needs python-olm: maubot's encryption extra

        return await E2EUser.login(synapse.url, user_id, password)
    login = synapse.login(user_id, password)
    return MatrixUser(synapse.url, user_id, login["access_token"])
