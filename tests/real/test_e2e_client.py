"""The end-to-end-encrypting test client itself, against a real Synapse (no maubot): two
``E2EUser`` devices in an encrypted room they made exchange encrypted messages, edits and
files both ways, and a message whose keys are withheld stays unreadable until they are
released. The encrypted plugin tests stand on this."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from devstack.e2e import E2EUser
from devstack.matrix import Event
from devstack.synapse import Synapse

pytestmark = pytest.mark.real
_names = itertools.count(1)


@pytest_asyncio.fixture
async def pair(synapse: Synapse) -> AsyncIterator[tuple[E2EUser, E2EUser, str]]:
    """Alice and Bob, each with an encrypting device, joined to Alice's encrypted room."""
    users = []
    for name in ("alice", "bob"):
        user_id = synapse.register(f"e2e_{name}{next(_names)}_{os.getpid()}", "pw")
        users.append(await E2EUser.login(synapse.url, user_id, "pw"))
    alice, bob = users
    try:
        room = await alice.create_encrypted_room(invite=[bob.user_id], name="secret")
        await bob.wait_for_invite(lambda r, _s: r == room)
        await bob.join(room)
        yield alice, bob, room
    finally:
        for user in users:
            await user.close()


def from_sender(sender: str, msgtype: str | None = None):
    def match(event: Event) -> bool:
        if event["type"] != "m.room.message" or event["sender"] != sender:
            return False
        return msgtype is None or event["content"].get("msgtype") == msgtype

    return match


async def test_the_room_is_encrypted_and_messages_go_encrypted_both_ways(pair) -> None:
    alice, bob, room = pair
    assert await alice.is_encrypted(room) and await bob.is_encrypted(room)

    mark = bob.mark()
    sent = await alice.send_text(room, "hello from alice")
    got = await bob.wait_for_event(room, from_sender(alice.user_id), mark)
    assert got["event_id"] == sent and got["decrypted"]
    assert got["content"]["body"] == "hello from alice"
    raw = await bob.request("GET", f"/_matrix/client/v3/rooms/{room}/event/{sent}")
    assert raw["type"] == "m.room.encrypted" and "hello" not in str(raw)  # the server's view

    mark = alice.mark()
    await bob.send_text(room, "hello from bob")
    back = await alice.wait_for_event(room, from_sender(bob.user_id), mark)
    assert back["decrypted"] and back["content"]["body"] == "hello from bob"


async def test_an_edit_decrypts_as_m_replace(pair) -> None:
    alice, bob, room = pair
    mark = bob.mark()
    first = await alice.send(room, {"msgtype": "m.notice", "body": "draft"})
    edit = {
        "msgtype": "m.notice",
        "body": "* final",
        "m.new_content": {"msgtype": "m.notice", "body": "final"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": first},
    }
    await alice.send(room, edit)

    def edited() -> bool:
        return (bob.latest_content(room, first) or {}).get("body") == "final"

    await bob.wait_until(edited, 60, "the edit")
    edits = [
        e
        for e in bob.events_since(room, mark)
        if e["content"].get("m.relates_to", {}).get("rel_type") == "m.replace"
    ]
    assert len(edits) == 1 and edits[0]["decrypted"]
    # the relation stays readable to the server (cleartext wrapper), the text does not
    wrapper = edits[0]["encrypted_event"]["content"]
    assert wrapper["m.relates_to"] == {"rel_type": "m.replace", "event_id": first}
    assert "final" not in str(wrapper)


async def test_files_go_encrypted_both_ways(pair) -> None:
    alice, bob, room = pair
    for sender, receiver, data in (
        (alice, bob, b"alice's notes\n" * 100),
        (bob, alice, bytes(range(256)) * 40),
    ):
        mark = receiver.mark()
        await sender.send_file(room, data, "notes.bin", "application/octet-stream")
        got = await receiver.wait_for_event(room, from_sender(sender.user_id, "m.file"), mark)
        content = got["content"]
        assert "url" not in content and content["body"] == "notes.bin"
        assert await receiver.download_decrypted(content["file"]) == data
        assert await receiver.download_content(content) == data
        assert await receiver.download(content["file"]["url"]) != data  # ciphertext at rest


async def test_withheld_keys_leave_a_message_unreadable_until_released(pair) -> None:
    alice, bob, room = pair
    mark = bob.mark()
    withheld = await alice.send_text_withheld(room, "you can't read this yet")
    after = await alice.send_text(room, "but this one you can")
    await bob.wait_for_event(room, lambda e: e["event_id"] == after, mark)
    stuck = [e for e in bob.undecryptable(room) if e["event_id"] == withheld]
    assert len(stuck) == 1 and "SessionNotFound" in stuck[0]["decryption_error"]
    # Alice's own device reads it (it keeps its inbound copy)
    await alice.wait_for_event(room, lambda e: e["event_id"] == withheld and e.get("decrypted"))

    await alice.release_keys(withheld)
    late = await bob.wait_for_event(
        room, lambda e: e["event_id"] == withheld and e.get("decrypted"), mark
    )
    assert late["content"]["body"] == "you can't read this yet"
    assert not bob.undecryptable(room)
    # Alice's room session is untouched: the next message is still readable
    mark = bob.mark()
    await alice.send_text(room, "still fine")
    nxt = await bob.wait_for_event(room, from_sender(alice.user_id), mark)
    assert nxt["content"]["body"] == "still fine"


async def test_a_plain_room_stays_plain_until_encryption_is_turned_on(pair) -> None:
    alice, bob, _room = pair
    plain = await alice.create_room(preset="private_chat", invite=[bob.user_id])
    await bob.wait_for_invite(lambda r, _s: r == plain)
    await bob.join(plain)
    assert not await alice.is_encrypted(plain)
    mark = bob.mark()
    await alice.send_text(plain, "in the clear")
    got = await bob.wait_for_event(plain, from_sender(alice.user_id), mark)
    assert got["content"]["body"] == "in the clear" and "decrypted" not in got

    await alice.send_state(plain, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    await alice.wait_until(lambda: alice.state_store.encryption.get(plain), 60, "encryption")
    assert await alice.is_encrypted(plain)
    mark = bob.mark()
    await alice.send_text(plain, "now secret")
    got = await bob.wait_for_event(plain, from_sender(alice.user_id), mark)
    assert got["decrypted"] and got["content"]["body"] == "now secret"
