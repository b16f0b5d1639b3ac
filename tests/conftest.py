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


@pytest_asyncio.fixture(scope="session", params=ENGINES)
async def stack(request: pytest.FixtureRequest, synapse: Synapse) -> AsyncIterator[Deployment]:
    """The plugin deployed in its own maubot, with its database on SQLite or PostgreSQL."""
    engine = request.param
    pg = request.getfixturevalue("postgres") if engine == "postgres" else None
    state = _state_dir(f"lambda-maubot-{engine}-")
    deployment = await deploy(
        state, synapse, pg, bot_localpart=f"lambda_{engine}", config=PLAIN_ROOMS
    )
    yield deployment
    await undeploy(deployment)
    if not os.environ.get("LAMBDA_KEEP_STATE"):
        shutil.rmtree(state, ignore_errors=True)


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
