"""A Matrix user with its own end-to-end-encrypting device: what encrypted tests act as.

Built on mautrix's own client and crypto (the same library maubot encrypts with): a password
login makes a fresh device, its Olm account lives in memory (``MemoryCryptoStore``) and its
device keys are uploaded at login. ``E2EUser`` is a ``MatrixUser``: every helper there
(``wait_until``, ``command``, ``wait_for_event``, ``wait_for_invite``, ``events_since``, …)
works the same, on the *decrypted* timeline. Sends are encrypted in encrypted rooms, files go
as encrypted attachments (``content.file``), and keys are shared with unverified devices (the
bot's device is never verified).

Timeline entries are plain event dicts, as ``MatrixUser`` keeps them. A decrypted event keeps
its ``event_id``/``sender``/``origin_server_ts``, takes the decrypted ``type`` and ``content``
(``m.relates_to`` from the cleartext wrapper merged in, so edits are ``m.replace`` as usual)
and gets ``"decrypted": True``. An event that can't be decrypted (yet) stays
``m.room.encrypted`` with ``"decryption_error"`` set, at its place; it is decrypted in place
when its keys arrive in a later sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from mautrix.client import Client
from mautrix.client.state_store import MemoryStateStore
from mautrix.crypto import OlmMachine
from mautrix.crypto import StateStore as CryptoStateStore
from mautrix.crypto.attachments import decrypt_attachment, encrypt_attachment
from mautrix.crypto.sessions import InboundGroupSession, OutboundGroupSession
from mautrix.crypto.store import MemoryCryptoStore
from mautrix.types import (
    CrossSigningUsage,
    DeviceLists,
    DeviceOTKCount,
    EncryptedEvent,
    EncryptedMegolmEventContent,
    EventType,
    Membership,
    RoomID,
    RoomKeyEventContent,
    SessionID,
    SigningKey,
    StateEvent,
    ToDeviceEvent,
    TOFUSigningKey,
    TrustState,
    UserID,
)

from .matrix import Event, MatrixUser

MEGOLM = "m.megolm.v1.aes-sha2"
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}
# A big timeline limit on every sync: a burst must not be cut to a "limited" window.
SYNC_FILTER = json.dumps({"room": {"timeline": {"limit": 1000}}})


class _StateStore(MemoryStateStore, CryptoStateStore):
    """mautrix's in-memory room state, with the one query the crypto machine adds."""

    async def find_shared_rooms(self, user_id: UserID) -> list[RoomID]:
        shared = (Membership.JOIN, Membership.INVITE)
        return [
            room_id
            for room_id, members in self.members.items()
            if await self.is_encrypted(room_id)
            and members.get(user_id) is not None
            and members[user_id].membership in shared
        ]


class _CryptoStore(MemoryCryptoStore):
    """mautrix's in-memory crypto store, which fails (``can't set attribute``) when it sees a
    user's cross-signing keys a second time (a cross-signed bot, in a second shared room):
    here the key is replaced, its first-seen key kept (trust on first use)."""

    async def put_cross_signing_key(
        self, user_id: UserID, usage: CrossSigningUsage, key: SigningKey
    ) -> None:
        keys = self._cross_signing_keys.setdefault(user_id, {})
        first = keys[usage].first if usage in keys else key
        keys[usage] = TOFUSigningKey(key=key, first=first)


class _HeldSession(OutboundGroupSession):
    """An outbound session whose key is shared late: it hands out its key as of index 0
    (an outbound session's ``session_key`` moves on with every message it encrypts)."""

    initial_key: str

    @property
    def share_content(self) -> RoomKeyEventContent:
        content = super().share_content
        content.session_key = self.initial_key
        return content


class E2EUser(MatrixUser):
    """A logged-in user with its own encrypting device. Make one with ``await E2EUser.login``."""

    def __init__(self, homeserver_url: str, client: Client, machine: OlmMachine) -> None:
        super().__init__(homeserver_url, client.mxid, client.api.token)
        self.client = client
        self.machine = machine
        self.device_id: str = client.device_id
        self.state_store: _StateStore = client.state_store
        self.pending: list[tuple[str, int]] = []  # (room, index) of events not decrypted yet
        self.withheld: dict[str, _HeldSession] = {}  # event id -> its unshared session
        self._sync_lock = asyncio.Lock()

    @classmethod
    async def login(
        cls, homeserver_url: str, user_id: str, password: str, device_name: str = "e2e test"
    ) -> E2EUser:
        """Password login (a new device), then the device's identity and one-time keys are
        uploaded, so others can encrypt for it from now on."""
        log = logging.getLogger(f"devstack.e2e.{user_id}")
        client = Client(base_url=homeserver_url, state_store=_StateStore(), log=log)
        try:
            await client.login(identifier=user_id, password=password, device_name=device_name)
            store = _CryptoStore(account_id=user_id, pickle_key="devstack-e2e")
            await store.put_device_id(client.device_id)
            machine = OlmMachine(client, store, client.state_store, log=log.getChild("crypto"))
            # Share room keys with every device that isn't blacklisted: the bot's device is
            # never verified. (This is mautrix's default; set here so it never changes silently.)
            machine.send_keys_min_trust = TrustState.UNVERIFIED
            await machine.load()
            await machine.share_keys()
            client.crypto = machine
        except BaseException:
            await client.api.session.close()
            raise
        return cls(homeserver_url, client, machine)

    async def close(self) -> None:
        await super().close()
        await self.client.api.session.close()

    # rooms

    async def is_encrypted(self, room_id: str) -> bool:
        """Whether the room has ``m.room.encryption`` (asked from the server once, then kept
        up to date by sync)."""
        known = await self.state_store.is_encrypted(RoomID(room_id))
        if known is not None:
            return known
        event = await self.state_event(room_id, "m.room.encryption")
        if event is None:
            self.state_store.encryption[RoomID(room_id)] = None  # known: not encrypted
            return False
        await self.state_store.set_encryption_info(RoomID(room_id), event["content"])
        return True

    async def create_encrypted_room(self, invite: list[str] | None = None, **body: Any) -> str:
        """A private room with encryption on from its creation, as Element makes them."""
        body.setdefault("preset", "private_chat")
        body["initial_state"] = [*body.get("initial_state", []), ENCRYPTION_STATE]
        return await self.create_room(invite=invite or [], **body)

    async def dm(self, other: str, encrypted: bool = True) -> str:
        """A direct chat with ``other``, encrypted by default (Element's default)."""
        return await super().dm(other, encrypted=encrypted)

    async def accept_invites(self, timeout: float = 60) -> list[str]:
        """Joins every room this user is invited to now (waits for at least one)."""
        await self.wait_until(lambda: bool(self.invites), timeout, "an invite")
        rooms = list(self.invites)
        for room_id in rooms:
            await self.join(room_id)
        return rooms

    # sending

    async def send(self, room_id: str, content: dict, event_type: str = "m.room.message") -> str:
        """Sends an event; in an encrypted room it goes as ``m.room.encrypted``, its keys shared
        with every member's devices (joined and invited) that the room knows now."""
        await self.sync_once(0)  # membership changes first: they decide who gets the keys
        if not await self.is_encrypted(room_id):
            return await super().send(room_id, content, event_type)
        room = RoomID(room_id)
        if not await self.state_store.has_full_member_list(room):
            await self.client.get_members(room)  # joined *and* invited, as Element shares
        encrypted = await self.client.encrypt(room, EventType.find(event_type), content)
        return await super().send(room_id, encrypted.serialize(), "m.room.encrypted")

    async def send_file(
        self, room_id: str, data: bytes, name: str, mime_type: str, msgtype: str = "m.file"
    ) -> str:
        """A file message; in an encrypted room the data is encrypted and sent as
        ``content.file`` (key, iv, hash), never as a plain ``url``."""
        if not await self.is_encrypted(room_id):
            return await super().send_file(room_id, data, name, mime_type, msgtype)
        ciphertext, file = encrypt_attachment(data)
        file.url = await self.upload(ciphertext, "application/octet-stream", "upload")
        content = {
            "msgtype": msgtype,
            "body": name,
            "file": file.serialize(),
            "info": {"mimetype": mime_type, "size": len(data)},
        }
        return await self.send(room_id, content)

    async def download_decrypted(self, file_content: dict) -> bytes:
        """The plaintext of an encrypted attachment (a message's ``content["file"]``); the
        hash is checked (``DecryptionError`` when it doesn't match)."""
        ciphertext = await self.download(file_content["url"])
        return decrypt_attachment(
            ciphertext,
            file_content["key"]["k"],
            file_content["hashes"]["sha256"],
            file_content["iv"],
        )

    async def download_content(self, content: dict) -> bytes:
        """A file message's data, encrypted (``file``) or not (``url``)."""
        if "file" in content:
            return await self.download_decrypted(content["file"])
        return await self.download(content["url"])

    async def send_text_withheld(self, room_id: str, text: str) -> str:
        """Sends a properly Megolm-encrypted text whose session is shared with *no one*: the
        other devices can't decrypt it until ``release_keys`` (if ever). Returns its id."""
        assert await self.is_encrypted(room_id), f"{room_id} is not encrypted"
        session = _HeldSession(RoomID(room_id))
        session.initial_key = session.session_key
        await self._keep_inbound_copy(session)
        session.shared = True  # encrypt() insists; nothing was sent to anyone
        payload = {
            "room_id": room_id,
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": text},
        }
        content = EncryptedMegolmEventContent(
            sender_key=self.machine.account.identity_key,
            device_id=self.client.device_id,
            ciphertext=session.encrypt(json.dumps(payload)),
            session_id=SessionID(session.id),
        )
        session.shared = False
        event_id = await super().send(room_id, content.serialize(), "m.room.encrypted")
        self.withheld[event_id] = session
        return event_id

    async def release_keys(self, event_id: str) -> None:
        """Shares the session of a ``send_text_withheld`` message with the room's devices now
        (the late-arriving keys case)."""
        session = self.withheld.pop(event_id)
        room = session.room_id
        store = self.machine.crypto_store
        current = await store.get_outbound_group_session(room)
        await self.sync_once(0)
        if not await self.state_store.has_full_member_list(room):
            await self.client.get_members(room)
        await store.add_outbound_group_session(session)
        try:
            await self.client.share_group_session(room)
        finally:
            await store.remove_outbound_group_session(room)
            if current is not None:
                await store.add_outbound_group_session(current)

    async def _keep_inbound_copy(self, session: OutboundGroupSession) -> None:
        """Our own device can read what it sent with a session nobody else got."""
        inbound = InboundGroupSession(
            session_key=session.session_key,
            signing_key=self.machine.account.signing_key,
            sender_key=self.machine.account.identity_key,
            room_id=session.room_id,
        )
        await self.machine.crypto_store.put_group_session(
            session.room_id, self.machine.account.identity_key, SessionID(session.id), inbound
        )

    # sync: crypto first (to-device keys, device lists), then the rooms, decrypting

    async def sync_once(self, timeout_ms: int = 1000) -> None:
        async with self._sync_lock:
            data = await self.client.sync(
                since=self.next_batch, timeout=timeout_ms, filter_id=SYNC_FILTER
            )
            self.next_batch = data["next_batch"]
            await self._handle_crypto(data)
            rooms = data.get("rooms", {})
            for room_id, room in rooms.get("join", {}).items():
                await self._handle_joined(room_id, room)
            for room_id, room in rooms.get("invite", {}).items():
                self.invites[room_id] = room.get("invite_state", {}).get("events", [])
                self.left.discard(room_id)
            for room_id, room in rooms.get("leave", {}).items():
                self.invites.pop(room_id, None)
                self.left.add(room_id)
                await self._update_state(room_id, room.get("timeline", {}).get("events", []))
            await self._retry_pending()

    async def _handle_crypto(self, data: dict) -> None:
        counts = data.get("device_one_time_keys_count", {})
        await self.machine.handle_otk_count(
            DeviceOTKCount(
                curve25519=counts.get("curve25519", 0),
                signed_curve25519=counts.get("signed_curve25519", 0),
            )
        )
        lists = data.get("device_lists", {})
        await self.machine.handle_device_lists(
            DeviceLists(changed=lists.get("changed", []), left=lists.get("left", []))
        )
        for raw in data.get("to_device", {}).get("events", []):
            if raw.get("type") != "m.room.encrypted":
                continue  # key requests are ignored on purpose: withheld keys stay withheld
            try:
                await self.machine.handle_to_device_event(ToDeviceEvent.deserialize(raw))
            except Exception:
                self.client.log.warning("could not handle a to-device event", exc_info=True)

    async def _handle_joined(self, room_id: str, room: dict) -> None:
        self.invites.pop(room_id, None)
        await self._update_state(room_id, room.get("state", {}).get("events", []))
        timeline = self.timelines.setdefault(room_id, [])
        for raw in room.get("timeline", {}).get("events", []):
            raw["room_id"] = room_id
            await self._update_state(room_id, [raw])
            timeline.append(raw)
            if raw.get("type") == "m.room.encrypted" and "state_key" not in raw:
                self.pending.append((room_id, len(timeline) - 1))

    async def _update_state(self, room_id: str, events: list[Event]) -> None:
        """Room state into mautrix's store; membership changes rotate our outbound session."""
        for raw in events:
            if "state_key" not in raw:
                continue
            evt = StateEvent.deserialize({**raw, "room_id": room_id})
            await self.state_store.update_state(evt)
            if evt.type == EventType.ROOM_MEMBER:
                await self.machine.handle_member_event(evt)

    async def _retry_pending(self) -> None:
        still: list[tuple[str, int]] = []
        for room_id, index in self.pending:
            timeline = self.timelines[room_id]
            decrypted = await self._decrypt(timeline[index])
            if "decryption_error" in decrypted:
                still.append((room_id, index))
            timeline[index] = decrypted
        self.pending = still

    async def _decrypt(self, raw: Event) -> Event:
        """The decrypted event dict, or the encrypted one with ``decryption_error`` set."""
        original = {k: v for k, v in raw.items() if k != "decryption_error"}
        try:
            evt = EncryptedEvent.deserialize(original)
            await self.machine.decrypt_megolm_event(evt)  # checks session, index, sender
            session = await self.machine.crypto_store.get_group_session(
                evt.room_id, evt.content.session_id
            )
            # mautrix's own Event rewrites edits' bodies when serialized: keep the plaintext.
            plaintext, _index = session.decrypt(evt.content.ciphertext)
            payload = json.loads(plaintext)
        except Exception as e:  # a test client records every failure, it never stops syncing
            return {**original, "decryption_error": f"{type(e).__name__}: {e}"}
        content = dict(payload["content"])
        relates_to = original["content"].get("m.relates_to")
        if relates_to and "m.relates_to" not in content:
            content["m.relates_to"] = relates_to
        return {
            **original,
            "type": payload["type"],
            "content": content,
            "decrypted": True,
            "encrypted_event": original,
        }

    # reading the decrypted timeline

    def undecryptable(self, room_id: str) -> list[Event]:
        """Events in the room that could not be decrypted (so far)."""
        return [e for e in self.timelines.get(room_id, []) if "decryption_error" in e]

    def latest_content(self, room_id: str, event_id: str) -> dict | None:
        """The content of ``event_id`` as it reads now: the newest ``m.replace`` edit's
        ``m.new_content`` by the same sender, else the original's content."""
        events = self.timelines.get(room_id, [])
        original = next((e for e in events if e.get("event_id") == event_id), None)
        if original is None:
            return None
        content = original["content"]
        for event in events:
            relation = event.get("content", {}).get("m.relates_to") or {}
            if (
                relation.get("rel_type") == "m.replace"
                and relation.get("event_id") == event_id
                and event.get("sender") == original.get("sender")
                and "m.new_content" in event["content"]
            ):
                content = event["content"]["m.new_content"]
        return content
