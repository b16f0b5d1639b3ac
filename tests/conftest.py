"""Fixtures for the real-level tests: a real Synapse, PostgreSQL and maubot per test session."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from devstack.federation import FederatedPair, sign_up, start_pair, stop_pair
from devstack.matrix import MatrixUser
from devstack.postgres import Postgres
from devstack.stack import Deployment, deploy, undeploy
from devstack.synapse import Synapse

ENGINES = ["sqlite", "postgres"]
# Plain chat rooms unless a test asks for encrypted ones (tests/real/test_encryption.py turns
# spaces.encryption to auto for its own users): the plain test client can't decrypt.
PLAIN_ROOMS = {"spaces": {"encryption": "never"}}
_names = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real: needs the real Synapse + maubot stack")


def _state_dir(prefix: str) -> Path:
    # World-traversable: PostgreSQL runs as its own system user when the tests run as root.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def synapse() -> Iterator[Synapse]:
    state = _state_dir("lambda-synapse-")
    server = Synapse(state)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    state = _state_dir("lambda-pg-")
    server = Postgres(state / "pg")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(state, ignore_errors=True)


async def _deployed(
    request: pytest.FixtureRequest, synapse: Synapse, bot: str, label: str = ""
) -> AsyncIterator[Deployment]:
    """The plugin deployed on ``synapse`` in its own maubot, the bot ``@<bot>_<engine>``, its
    database on the engine of ``request.param``."""
    engine = request.param
    pg = request.getfixturevalue("postgres") if engine == "postgres" else None
    state = _state_dir(f"lambda-maubot-{label}{engine}-")
    deployment = await deploy(
        state, synapse, pg, bot_localpart=f"{bot}_{engine}", config=PLAIN_ROOMS
    )
    yield deployment
    await undeploy(deployment)
    if not os.environ.get("LAMBDA_KEEP_STATE"):
        shutil.rmtree(state, ignore_errors=True)


@pytest_asyncio.fixture(scope="session", params=ENGINES)
async def stack(request: pytest.FixtureRequest, synapse: Synapse) -> AsyncIterator[Deployment]:
    """The plugin deployed in its own maubot, with its database on SQLite or PostgreSQL."""
    async for deployment in _deployed(request, synapse, "lambda"):
        yield deployment


@pytest_asyncio.fixture
async def new_user(stack: Deployment):
    """Makes fresh users; each test gets its own, so tests never see each other's rooms."""
    made = []

    async def make(prefix: str = "user"):
        user = await stack.user(f"{prefix}{next(_names)}_{os.getpid()}_{stack.engine}")
        made.append(user)
        return user

    yield make
    for user in made:
        await user.close()
        stack.users.remove(user)


# Federation (issue 21): started only by the tests that ask for it.


@pytest.fixture(scope="session")
def federation() -> Iterator[FederatedPair]:
    """Two homeservers federating on 127.0.0.1 (``devstack.federation``): ``home``, the bot's,
    behind a ``DelayFront`` (``federation.front.delay_s`` slows its federation down), and
    ``remote``, where the users of other servers live. Not the session's plain ``synapse``."""
    state = _state_dir("lambda-federation-")
    pair = start_pair(state, delayed=True)
    yield pair
    stop_pair(pair)
    if not os.environ.get("LAMBDA_KEEP_STATE"):
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def remote_synapse(federation: FederatedPair) -> Synapse:
    return federation.remote


@pytest_asyncio.fixture(scope="session", params=ENGINES)
async def federated_stack(
    request: pytest.FixtureRequest, federation: FederatedPair
) -> AsyncIterator[Deployment]:
    """Like ``stack`` (SQLite and PostgreSQL), on the federating ``home`` server."""
    async for deployment in _deployed(request, federation.home, "lambda_fed", "fed-"):
        yield deployment


def remote_name(prefix: str, engine: str) -> str:
    """A fresh localpart on the remote server (shared by both engines' deployments)."""
    return f"{prefix}{next(_names)}_{os.getpid()}_{engine}"


@pytest_asyncio.fixture
async def remote_user(federated_stack: Deployment, remote_synapse: Synapse):
    """Makes fresh users on the remote server (``e2e=True``: with an encrypting device)."""
    made: list[MatrixUser] = []

    async def make(prefix: str = "far", e2e: bool = False) -> MatrixUser:
        user = await sign_up(remote_synapse, remote_name(prefix, federated_stack.engine), e2e=e2e)
        made.append(user)
        return user

    yield make
    for user in made:
        await user.close()
