"""Whether the bot's device is cross-signed: the /keys/query judgement (with real ed25519
signatures, made as mautrix makes them), the start's one warning, and `!lambda status`'s line."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import olm
import pytest
from mautrix.crypto.signature import sign_olm

from lambda_plugin import crypto as signing
from lambda_plugin.commands.admin import AdminCommands
from lambda_plugin.crypto import Signing, check_at_start, device_signing, judge
from lambda_plugin.notices import Notices

BOT, DEVICE = "@bot:example.org", "BOTDEVICE"


def _key(usage: str, pub: str, signer: olm.PkSigning | None) -> dict:
    obj: dict[str, Any] = {"user_id": BOT, "usage": [usage], "keys": {f"ed25519:{pub}": pub}}
    if signer is not None:
        obj["signatures"] = {BOT: {f"ed25519:{signer.public_key}": sign_olm(dict(obj), signer)}}
    return obj


@dataclass
class Account:
    """A bot account's cross-signing keys and its device, as /keys/query would show them."""

    master: olm.PkSigning = field(default_factory=lambda: olm.PkSigning(olm.PkSigning.generate_seed()))
    ssk: olm.PkSigning = field(default_factory=lambda: olm.PkSigning(olm.PkSigning.generate_seed()))
    device_signer: olm.PkSigning | None = None  # who signs the device (None: the ssk)
    sign_device: bool = True
    sign_ssk: bool = True

    def response(self) -> dict:
        device: dict[str, Any] = {
            "user_id": BOT, "device_id": DEVICE, "algorithms": ["m.megolm.v1.aes-sha2"],
            "keys": {f"ed25519:{DEVICE}": "devkey", f"curve25519:{DEVICE}": "curvekey"},
        }  # fmt: skip
        if self.sign_device:
            signer = self.device_signer or self.ssk
            device["signatures"] = {BOT: {f"ed25519:{signer.public_key}": sign_olm(dict(device), signer)}}
        return {
            "device_keys": {BOT: {DEVICE: device}},
            "master_keys": {BOT: _key("master", self.master.public_key, None)},
            "self_signing_keys": {
                BOT: _key("self_signing", self.ssk.public_key, self.master if self.sign_ssk else None)
            },
        }


def _forged(response: dict) -> dict:
    device = response["device_keys"][BOT][DEVICE]
    ((key_id, sig),) = device["signatures"][BOT].items()
    device["signatures"][BOT][key_id] = ("A" if sig[0] != "A" else "B") + sig[1:]
    return response


def _no_master(response: dict) -> dict:
    response.pop("master_keys")
    return response


def _device_list(response: dict) -> dict:
    response["device_keys"] = {BOT: [DEVICE]}
    return response


def test_a_device_signed_by_the_self_signing_key_is_signed() -> None:
    assert judge(Account().response(), BOT, DEVICE) is Signing.SIGNED


@pytest.mark.parametrize(
    ("account", "change", "expected"),
    [
        (Account(sign_device=False), None, Signing.UNSIGNED),
        (Account(device_signer=olm.PkSigning(olm.PkSigning.generate_seed())), None, Signing.UNSIGNED),
        (Account(), _forged, Signing.UNSIGNED),
        (Account(sign_ssk=False), None, Signing.NOT_SET_UP),
        (Account(), _no_master, Signing.NOT_SET_UP),
        (Account(), _device_list, Signing.UNSIGNED),
    ],
    ids=[
        "device unsigned", "signed by another key", "forged signature", "ssk unsigned", "no keys",
        "devices not an object",
    ],
)
def test_what_is_not_a_valid_chain_is_not_signed(account, change, expected) -> None:
    response = account.response()
    assert judge(change(response) if change else response, BOT, DEVICE) is expected


@pytest.mark.parametrize(
    "response",
    [
        None, [], "x", {}, {"master_keys": []}, {"master_keys": [1]}, {"master_keys": {BOT: "x"}},
        {"device_keys": ["x"]}, {"device_keys": {BOT: [DEVICE]}},
        {"master_keys": {BOT: {"usage": "master", "keys": []}}},
        {"master_keys": {BOT: {"usage": ["master"], "keys": {"ed25519:a": "b"}}}},
        {"device_keys": {BOT: {DEVICE: {"signatures": {BOT: {"ed25519:x": 5}}}}}},
    ],
)  # fmt: skip
def test_a_hostile_or_malformed_response_never_raises_nor_counts_as_signed(response) -> None:
    assert judge(response, BOT, DEVICE) is not Signing.SIGNED


class FakeMatrix:
    """What the check uses of ``Matrix``: the ids, crypto, one request."""

    def __init__(self, answer: Any = None, crypto: bool = True, hang: bool = False) -> None:
        self.user_id, self.device_id = BOT, DEVICE
        self.crypto = SimpleNamespace(available=crypto)
        self.answer, self.hang, self.calls = answer, hang, 0

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls += 1
        assert (method, path) == ("POST", signing.KEYS_QUERY)
        assert body["device_keys"] == {BOT: [DEVICE]}
        if self.hang:
            await asyncio.sleep(3600)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def _start_check(mx: FakeMatrix, caplog: pytest.LogCaptureFixture) -> list[str]:
    log = logging.getLogger("test.signing")
    with caplog.at_level(logging.INFO, logger="test.signing"):
        await asyncio.wait_for(check_at_start(mx, log, retry_s=0), 5)  # type: ignore[arg-type]
    return _warnings(caplog)


@pytest.mark.parametrize(
    ("account", "why"),
    [(Account(sign_device=False), "not signed by"), (Account(sign_ssk=False), "no cross-signing keys")],
)
async def test_start_warns_once_when_the_device_is_not_cross_signed(account, why, caplog) -> None:
    warnings = await _start_check(FakeMatrix(account.response()), caplog)
    assert len(warnings) == 1 and DEVICE in warnings[0] and why in warnings[0], warnings
    assert "admin UI" in warnings[0]


async def test_start_says_nothing_when_signed(caplog) -> None:
    assert await _start_check(FakeMatrix(Account().response()), caplog) == []


async def test_without_crypto_no_warning_and_no_request(caplog) -> None:
    mx = FakeMatrix(crypto=False)
    assert await _start_check(mx, caplog) == []
    assert mx.calls == 0
    assert any("No end-to-end encryption" in r.getMessage() for r in caplog.records)


async def test_a_homeserver_that_fails_is_tried_a_few_times_and_logged_once(caplog) -> None:
    mx = FakeMatrix(RuntimeError("502 down"))
    warnings = await _start_check(mx, caplog)
    assert mx.calls == signing.START_TRIES
    assert len(warnings) == 1 and "Could not check" in warnings[0], warnings


async def test_a_homeserver_that_never_answers_bounds_each_check(monkeypatch) -> None:
    mx = FakeMatrix(hang=True)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(device_signing(mx, timeout_s=0.2), 5)  # type: ignore[arg-type]


def _status_owner(mx: FakeMatrix, language: str = "en") -> Any:
    settings = SimpleNamespace(language=language)
    notices = Notices(mx, lambda: settings)  # type: ignore[arg-type]
    return SimpleNamespace(spaces=SimpleNamespace(mx=mx), notices=notices, log=logging.getLogger("t"))


@pytest.mark.parametrize(
    ("mx", "expected"),
    [
        (FakeMatrix(Account().response()), "✅ cross-signed"),
        (FakeMatrix(Account(sign_device=False).response()), "not cross-signed: not signed"),
        (FakeMatrix(Account(sign_ssk=False).response()), "no cross-signing keys"),
        (FakeMatrix(crypto=False), "no cross-signing without end-to-end encryption"),
        (FakeMatrix(RuntimeError("down")), "cross-signing unknown"),
    ],
    ids=["signed", "unsigned", "not set up", "no crypto", "homeserver down"],
)
async def test_status_says_whether_the_device_is_cross_signed(mx, expected) -> None:
    line = await AdminCommands.signing_line(_status_owner(mx))
    assert expected in line and DEVICE in line, line
    if expected != "✅ cross-signed":
        assert "✅" not in line


async def test_status_in_russian() -> None:
    line = await AdminCommands.signing_line(_status_owner(FakeMatrix(Account().response()), "ru"))
    assert "подписано кросс-подписью" in line, line
