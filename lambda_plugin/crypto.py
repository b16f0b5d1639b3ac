"""End-to-end encryption through maubot's own client crypto (mautrix's OlmMachine).

maubot gives a client crypto when it is installed with its ``encryption`` extra and the
client has a device id. Live events reach the plugin's handlers decrypted; what the plugin
reads itself (the catch-up's /sync) and sends itself (its own HTTP calls) goes through here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from mautrix.client import Client
from mautrix.errors import DecryptionError, EncryptionError, MNotFound
from mautrix.types import (
    JSON,
    EncryptedEvent,
    EventType,
    Membership,
    RoomEncryptionStateEventContent,
    RoomID,
    UserID,
)

if TYPE_CHECKING:
    from .matrix import Matrix

MEGOLM = "m.megolm.v1.aes-sha2"
ENCRYPTED = "m.room.encrypted"
PLAIN_KNOWN_S = 60  # how long "this room is not encrypted" is believed without asking again
# What Megolm adds to a plaintext: a version byte, the message index (tag and varint, up to 6
# bytes), the ciphertext's tag and length (up to 4), AES-CBC padding (1 to 16), an 8-byte MAC
# and a 64-byte signature; then it is all unpadded base64 (4 bytes for every 3).
MEGOLM_FRAMING = 1 + 6 + 4 + 16 + 8 + 64
# What the encrypted plaintext holds besides the content: {"room_id": …, "type": …,
# "content": …} with ids of up to 255 characters, and a field the answer stage adds to the
# content after it was measured (``notices.answering``: a name and an event id).
PAYLOAD_OVERHEAD = 64 + 255 + 255 + 64 + 255
# The m.room.encrypted content around the ciphertext: its keys and punctuation, algorithm,
# sender key, session id, device id, and the m.relates_to an edit carries in the clear.
ENVELOPE_OVERHEAD = 160 + len(MEGOLM) + 43 + 43 + 255 + 64 + 255


def encryption_state() -> dict[str, Any]:
    """The ``initial_state`` entry that makes a new room end-to-end encrypted."""
    return {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}


def sealed_size(plain: int) -> int:
    """An upper bound of the bytes of the ``m.room.encrypted`` content that carries event
    content of ``plain`` bytes of JSON, measured as mautrix encrypts it (``json.dumps`` with
    its defaults, non-ASCII escaped): about 4/3 of it, plus at most about 2 KB."""
    message = plain + PAYLOAD_OVERHEAD + MEGOLM_FRAMING
    return -(-message * 4 // 3) + ENVELOPE_OVERHEAD


class Crypto:
    def __init__(self, client: Client, log: logging.Logger) -> None:
        self.client = client
        self.log = log
        self._plain: dict[str, float] = {}  # room -> when it was last seen unencrypted
        self._share_locks: dict[str, asyncio.Lock] = {}

    @property
    def available(self) -> bool:
        """Whether the bot can encrypt and decrypt (maubot gave its client crypto)."""
        return getattr(self.client, "crypto", None) is not None

    async def is_encrypted(self, room_id: str) -> bool:
        """Whether the room is end-to-end encrypted (the state store, else the room)."""
        room, store = RoomID(room_id), self.client.state_store
        if store is not None and await store.is_encrypted(room):
            return True
        if time.monotonic() - self._plain.get(room_id, -PLAIN_KNOWN_S) < PLAIN_KNOWN_S:
            return False
        try:
            content = await self.client.get_state_event(room, EventType.ROOM_ENCRYPTION)
        except MNotFound:
            self._plain[room_id] = time.monotonic()
            return False
        # Anything else (429, 5xx, time-out) raises: nothing goes out in the clear because
        # the room's state could not be read.
        info = RoomEncryptionStateEventContent.deserialize(cast(JSON, content.serialize()))
        if store is not None:
            await store.set_encryption_info(room, info)
        return True

    async def must_seal(self, room_id: str) -> bool:
        """Whether what the bot sends into the room goes out encrypted (it can, the room is)."""
        return self.available and await self.is_encrypted(room_id)

    def forget(self, room_id: str) -> None:
        """The room's encryption changed (the bot turned it on): ask again next time."""
        self._plain.pop(room_id, None)

    async def seal(self, room_id: str, event_type: str, content: dict[str, Any]) -> tuple[str, dict]:
        """The event as it must be sent: encrypted in an encrypted room when the bot can."""
        if not await self.must_seal(room_id):
            return event_type, content
        room, crypto = RoomID(room_id), self.client.crypto
        assert crypto is not None
        # mautrix takes JSON content as it is (typed there as its content classes only).
        plain, etype = cast(Any, content), EventType.find(event_type)
        try:
            sealed = await crypto.encrypt_megolm_event(room, etype, plain)
        except EncryptionError:
            await self._share(room)
            sealed = await crypto.encrypt_megolm_event(room, etype, plain)
        return ENCRYPTED, sealed.serialize()

    async def _share(self, room: RoomID) -> None:
        """A new Megolm session, shared with the room's joined AND invited members: the
        welcome lands in a chat room the user has only been invited to so far, and mautrix's
        own sharing would leave them out (they could never read it)."""
        crypto = self.client.crypto
        assert crypto is not None
        async with self._share_locks.setdefault(room, asyncio.Lock()):
            await crypto.wait_group_session_share(room)
            session = await crypto.crypto_store.get_outbound_group_session(room)
            if session and session.shared and not session.expired:
                return  # shared meanwhile
            members = await self.client.get_members(room)
            users = [
                UserID(m.state_key) for m in members
                if getattr(m.content, "membership", None) in (Membership.JOIN, Membership.INVITE)
            ]  # fmt: skip
            await crypto.share_group_session(room, users)

    async def open(self, room_id: str, raw: dict[str, Any]) -> dict[str, Any] | None:
        """An encrypted event of a /sync as the event it holds; None when it can't be
        decrypted (yet: its keys may still arrive) or the bot has no crypto."""
        crypto = getattr(self.client, "crypto", None)
        if crypto is None:
            return None
        try:
            event = EncryptedEvent.deserialize(cast(JSON, {**raw, "room_id": room_id}))
            decrypted = await crypto.decrypt_megolm_event(event)
        except DecryptionError as e:
            self.log.debug("Can't decrypt %s in %s yet: %s", raw.get("event_id"), room_id, e)
            return None
        except Exception:  # a malformed event: skipped, never fatal
            self.log.debug("Skipping a malformed encrypted event in %s", room_id)
            return None
        return cast(dict, decrypted.serialize())

    async def open_all(self, timelines: dict[str, list[dict[str, Any]]]) -> None:
        """Replaces each encrypted event of the timelines by what it holds, where the keys
        are there (the rest stay as they are: intake ignores them)."""
        for room_id, events in timelines.items():
            for i, raw in enumerate(events):
                if raw.get("type") == ENCRYPTED and (opened := await self.open(room_id, raw)):
                    events[i] = opened


# Cross-signing: whether the bot's device is signed by its account's self-signing key, which
# the master key signs, as any client sees it (a client trusts such a device: no red shield,
# keys shared under stricter rules). Read from the homeserver's /keys/query, what clients
# read, not mautrix's cache: a device cross-signed meanwhile (maubot's admin UI) is seen
# without a restart. An operator cross-signs it in maubot's admin UI (docs/operations.md).

KEYS_QUERY = "/_matrix/client/v3/keys/query"
CHECK_TIMEOUT_S = 15.0  # one check, whatever the homeserver does (rate limits, no answer)
START_TRIES = 3  # the start's check, tried again while the homeserver does not answer
START_RETRY_S = 20.0

Verify = Callable[[dict, str, str, str], bool]  # (signed object, user id, key name, public key)


class Signing(enum.Enum):
    NO_CRYPTO = "no_crypto"  # maubot gave the client no crypto: nothing to sign
    NOT_SET_UP = "not_set_up"  # the account has no (valid) cross-signing keys
    UNSIGNED = "unsigned"  # it has them, and this device is not signed by them
    SIGNED = "signed"
    UNKNOWN = "unknown"  # the homeserver could not be asked

    @property
    def unsigned(self) -> bool:
        """Clients show the bot's messages as from an unverified device."""
        return self in (Signing.NOT_SET_UP, Signing.UNSIGNED)


def _verify_olm(data: dict, user_id: str, key_name: str, key: str) -> bool:
    # Imported here: it needs python-olm, which only a client with crypto has.
    from mautrix.crypto.signature import verify_signature_json
    from mautrix.types import SigningKey, UserID

    return verify_signature_json(data, UserID(user_id), key_name, SigningKey(key))  # type: ignore[arg-type]


def _ed25519(key_object: Any, usage: str) -> str | None:
    """The public key of a cross-signing key object of ``usage``, if it is one."""
    if not isinstance(key_object, dict) or usage not in (key_object.get("usage") or []):
        return None
    keys = key_object.get("keys")
    if not isinstance(keys, dict) or len(keys) != 1:
        return None
    (key_id, key), = keys.items()
    ok = isinstance(key_id, str) and key_id.startswith("ed25519:") and isinstance(key, str)
    return key if ok and key_id == f"ed25519:{key}" else None


def judge(response: Any, user_id: str, device_id: str, verify: Verify = _verify_olm) -> Signing:
    """How a /keys/query ``response`` shows the device: its account's master key, the
    self-signing key signed by it, the device signed by that (each signature checked)."""
    if not isinstance(response, dict):
        return Signing.UNKNOWN
    master = _ed25519(_at(response, "master_keys", user_id), "master")
    ssk_object = _at(response, "self_signing_keys", user_id)
    ssk = _ed25519(ssk_object, "self_signing")
    if master is None or ssk is None or not _signed(verify, ssk_object, user_id, master):
        return Signing.NOT_SET_UP
    device = _at(response, "device_keys", user_id, device_id)
    return Signing.SIGNED if _signed(verify, device, user_id, ssk) else Signing.UNSIGNED


def _at(data: Any, *keys: str) -> Any:
    """``data[k1][k2]…``, or None where a level is missing or not an object."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _signed(verify: Verify, data: Any, user_id: str, key: str) -> bool:
    signatures = data.get("signatures") if isinstance(data, dict) else None
    if not isinstance(signatures, dict) or not isinstance(signatures.get(user_id), dict):
        return False
    try:
        return bool(verify(data, user_id, key, key))
    except Exception:  # a malformed key or signature: not signed
        return False


async def device_signing(mx: Matrix, timeout_s: float = CHECK_TIMEOUT_S) -> Signing:
    """Whether the bot's device is cross-signed; raises when the homeserver can't be asked
    within ``timeout_s`` (or refuses)."""
    device_id = mx.device_id
    if not mx.crypto.available or not device_id:
        return Signing.NO_CRYPTO
    body = {"device_keys": {mx.user_id: [device_id]}, "timeout": int(timeout_s * 1000)}
    response = await asyncio.wait_for(
        mx.request("POST", KEYS_QUERY, body, timeout_s=timeout_s), timeout_s
    )
    return judge(response, mx.user_id, device_id)


async def check_at_start(mx: Matrix, log: logging.Logger, retry_s: float = START_RETRY_S) -> None:
    """One log line at start about the bot's device: a warning when it is not cross-signed
    (or could not be checked), info when it is; never raises. In the background: a start
    never waits for it."""
    for attempt in range(1, START_TRIES + 1):
        try:
            state = await device_signing(mx)
            break
        except Exception as e:
            if attempt == START_TRIES:
                log.warning("Could not check whether the bot's device is cross-signed: %r", e)
                return
        await asyncio.sleep(retry_s)
    if state is Signing.NO_CRYPTO:
        log.info("No end-to-end encryption for this client: nothing to cross-sign")
    elif state is Signing.SIGNED:
        log.info("The bot's device %s is cross-signed", mx.device_id)
    elif state.unsigned:
        why = "its account has no cross-signing keys" if state is Signing.NOT_SET_UP else (
            "it is not signed by its account's self-signing key"
        )
        log.warning(
            "The bot's device %s is not cross-signed (%s): clients mark its messages as from"
            " an unverified device. Cross-sign it in maubot's admin UI (the client's Generate"
            " recovery key, or Verify with the recovery key); see docs/operations.md",
            mx.device_id, why,
        )  # fmt: skip
    else:
        log.warning("Could not check whether the bot's device is cross-signed: %s", state)
