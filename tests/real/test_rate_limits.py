"""With the homeserver's rate limits left low, provisioning still completes, exactly once."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import pytest_asyncio

from devstack.stack import deploy, undeploy
from devstack.synapse import Synapse

from ..conftest import PLAIN_ROOMS, _state_dir
from .helpers import is_room_invite, is_space_invite

pytestmark = pytest.mark.real

LOW = {"per_second": 0.5, "burst_count": 2}
LOW_LIMITS = {
    "rc_message": LOW,
    "rc_room_creation": LOW,
    "rc_invites": {"per_room": LOW, "per_user": LOW, "per_issuer": LOW},
    "rc_joins": {"local": LOW, "remote": LOW},
    # Registration and login stay open: they are the test's set-up, not what it tests.
    "rc_registration": {"per_second": 1000, "burst_count": 1000},
    "rc_login": {
        k: {"per_second": 1000, "burst_count": 1000}
        for k in ("address", "account", "failed_attempts")
    },
}


@pytest_asyncio.fixture(scope="module")
async def limited():
    state = _state_dir("lambda-limited-")
    synapse = Synapse(state / "synapse", limits=LOW_LIMITS)
    try:
        synapse.start()
        deployment = await deploy(
            state / "maubot", synapse, None, bot_localpart="lambda_limited", config=PLAIN_ROOMS
        )
        yield deployment
        await undeploy(deployment)
    finally:
        synapse.stop()
        shutil.rmtree(state, ignore_errors=True)


async def test_provisioning_under_low_rate_limits(limited) -> None:
    users = [await limited.user(f"busy{i}") for i in range(3)]
    await asyncio.gather(*(u.dm(limited.bot_id) for u in users))

    async def onboarded(user):
        await user.wait_for_invite(is_space_invite, timeout=180)
        await user.wait_for_invite(is_room_invite, timeout=180)

    await asyncio.gather(*(onboarded(u) for u in users))
    for user in users:
        await user.sync_once(0)
        assert len([r for r, s in user.invites.items() if is_space_invite(r, s)]) == 1
        assert len([r for r, s in user.invites.items() if is_room_invite(r, s)]) == 1
    # The limits were really met, and waited out rather than failed.
    log = limited.maubot.log_text()
    assert "Rate limited on" in log
    assert "Provisioning for" not in log  # no provisioning failed
