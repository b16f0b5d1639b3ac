"""A plain Matrix user over the client-server API: what tests and benchmarks act as."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

Event = dict[str, Any]
Mark = dict[str, int]


class MatrixError(RuntimeError):
    def __init__(self, status: int, body: dict | str) -> None:
        self.status = status
        self.body = body
        self.errcode = body.get("errcode") if isinstance(body, dict) else None
        super().__init__(f"{status} {body}")


class MatrixUser:
    def __init__(self, homeserver_url: str, user_id: str, access_token: str) -> None:
        self.hs = homeserver_url
        self.user_id = user_id
        self.token = access_token
        self.http = aiohttp.ClientSession()
        self.next_batch: str | None = None
        self.timelines: dict[str, list[Event]] = {}
        self.invites: dict[str, list[Event]] = {}
        self.left: set[str] = set()
        self.txn = 0

    async def close(self) -> None:
        await self.http.close()

    async def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """One call; a 429 is waited out as the server asks (bounded), any other error raised."""
        for _ in range(20):
            async with self.http.request(
                method,
                self.hs + path,
                json=body,
                params=params or None,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=120),
            ) as resp:
                text = await resp.text()
                try:
                    data = json.loads(text) if text else {}
                except ValueError:
                    data = text
                if resp.status == 429 and isinstance(data, dict):
                    await asyncio.sleep(min(data.get("retry_after_ms", 500), 10_000) / 1000)
                    continue
                if resp.status >= 400:
                    raise MatrixError(resp.status, data)
                return data
        raise MatrixError(429, "rate limited too often")

    # rooms

    async def create_room(self, **body: Any) -> str:
        return (await self.request("POST", "/_matrix/client/v3/createRoom", body))["room_id"]

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.request(
            "POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/invite", {"user_id": user_id}
        )

    async def join(self, room_id: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/join/{quote(room_id)}", {})

    async def leave(self, room_id: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/leave", {})

    async def dm(self, other: str, encrypted: bool = False) -> str:
        """A direct chat with ``other``, set up the way Element does it."""
        initial_state = []
        if encrypted:
            initial_state.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
        return await self.create_room(
            preset="trusted_private_chat",
            is_direct=True,
            invite=[other],
            initial_state=initial_state,
        )

    async def send(self, room_id: str, content: dict, event_type: str = "m.room.message") -> str:
        self.txn += 1
        txn = f"{time.time_ns()}-{self.txn}"
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/send/{event_type}/{txn}"
        return (await self.request("PUT", path, content))["event_id"]

    async def send_text(self, room_id: str, body: str) -> str:
        return await self.send(room_id, {"msgtype": "m.text", "body": body})

    async def send_state(
        self, room_id: str, event_type: str, content: dict, state_key: str = ""
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{event_type}/{quote(state_key)}"
        return (await self.request("PUT", path, content))["event_id"]

    async def state(self, room_id: str) -> list[Event]:
        return await self.request("GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state")

    async def state_event(self, room_id: str, event_type: str, state_key: str = "") -> Event | None:
        """The full state event (sender included), or None when the room has none."""
        for event in await self.state(room_id):
            if event["type"] == event_type and event.get("state_key") == state_key:
                return event
        return None

    async def joined_rooms(self) -> list[str]:
        return (await self.request("GET", "/_matrix/client/v3/joined_rooms"))["joined_rooms"]

    async def upload(self, data: bytes, mime_type: str, filename: str) -> str:
        async with self.http.post(
            self.hs + "/_matrix/media/v3/upload",
            params={"filename": filename},
            data=data,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": mime_type},
        ) as resp:
            body = await resp.json()
            if resp.status >= 400:
                raise MatrixError(resp.status, body)
            return body["content_uri"]

    async def download(self, mxc: str) -> bytes:
        server, media_id = mxc.removeprefix("mxc://").split("/", 1)
        async with self.http.get(
            f"{self.hs}/_matrix/client/v1/media/download/{server}/{media_id}",
            headers={"Authorization": f"Bearer {self.token}"},
        ) as resp:
            if resp.status >= 400:
                raise MatrixError(resp.status, await resp.text())
            return await resp.read()

    async def send_file(
        self, room_id: str, data: bytes, name: str, mime_type: str, msgtype: str = "m.file"
    ) -> str:
        """Uploads ``data`` and sends it as a file message, as a client does."""
        mxc = await self.upload(data, mime_type, "upload")
        content = {
            "msgtype": msgtype,
            "body": name,
            "url": mxc,
            "info": {"mimetype": mime_type, "size": len(data)},
        }
        return await self.send(room_id, content)

    # sync and waiting

    def mark(self) -> Mark:
        """Where each room's timeline stands now; wait_for looks only past it."""
        return {room_id: len(events) for room_id, events in self.timelines.items()}

    async def sync_once(self, timeout_ms: int = 1000) -> None:
        # A big timeline limit on every sync: a burst must not be cut to a "limited" window.
        params: dict[str, Any] = {
            "timeout": str(timeout_ms),
            "filter": json.dumps({"room": {"timeline": {"limit": 1000}}}),
        }
        if self.next_batch:
            params["since"] = self.next_batch
        data = await self.request("GET", "/_matrix/client/v3/sync", **params)
        self.next_batch = data["next_batch"]
        rooms = data.get("rooms", {})
        for room_id, room in rooms.get("join", {}).items():
            self.timelines.setdefault(room_id, []).extend(
                room.get("timeline", {}).get("events", [])
            )
            self.invites.pop(room_id, None)
        for room_id, room in rooms.get("invite", {}).items():
            self.invites[room_id] = room.get("invite_state", {}).get("events", [])
            self.left.discard(room_id)
        for room_id in rooms.get("leave", {}):
            self.invites.pop(room_id, None)
            self.left.add(room_id)

    async def wait_until(
        self, check: Callable[[], Any], timeout: float = 60, what: str = "condition"
    ) -> Any:
        """Syncs until ``check()`` returns something truthy, and returns it."""
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.user_id}: timed out waiting for {what}")
            await self.sync_once(timeout_ms=int(min(left, 2) * 1000))

    def events_since(self, room_id: str, mark: Mark | None = None) -> list[Event]:
        start = (mark or {}).get(room_id, 0)
        return self.timelines.get(room_id, [])[start:]

    async def wait_for_event(
        self,
        room_id: str,
        predicate: Callable[[Event], bool],
        mark: Mark | None = None,
        timeout: float = 60,
    ) -> Event:
        def check() -> Event | None:
            return next((e for e in self.events_since(room_id, mark) if predicate(e)), None)

        return await self.wait_until(check, timeout, f"an event in {room_id}")

    async def wait_for_reply(
        self, room_id: str, sender: str, mark: Mark | None = None, timeout: float = 60
    ) -> Event:
        """The next message from ``sender`` (the bot) in the room after ``mark``."""
        return await self.wait_for_event(
            room_id,
            lambda e: e["type"] == "m.room.message" and e["sender"] == sender,
            mark,
            timeout,
        )

    async def command(self, room_id: str, text: str, bot: str, timeout: float = 60) -> Event:
        """Sends ``text`` and returns the bot's next message in the room."""
        await self.sync_once(0)
        mark = self.mark()
        await self.send_text(room_id, text)
        return await self.wait_for_reply(room_id, bot, mark, timeout)

    async def wait_until_reply_contains(
        self, room_id: str, text: str, bot: str, expected: str, timeout: float = 60
    ) -> str:
        """Repeats a command until the bot's answer contains ``expected`` (for state the bot
        learns asynchronously, such as a rename done in the client)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.command(room_id, text, bot, timeout)
            body = reply["content"]["body"]
            if expected in body or time.monotonic() > deadline:
                return body

    async def wait_for_invite(
        self, predicate: Callable[[str, list[Event]], bool] = lambda r, s: True, timeout: float = 60
    ) -> str:
        """A room id this user is invited to and whose invite state matches."""

        def check() -> str | None:
            return next((r for r, s in self.invites.items() if predicate(r, s)), None)

        return await self.wait_until(check, timeout, "an invite")


def invite_state_value(state: list[Event], event_type: str, key: str) -> Any:
    for event in state:
        if event["type"] == event_type:
            return event.get("content", {}).get(key)
    return None
