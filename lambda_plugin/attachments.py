"""Files as a service of the answer stage: a user's file in, an agent's files out.

The workspace rules (names, size, which folder) live in ``files``; this part chooses the way
(workspace, inline for agents that take files so, or refused) and tells the user a refusal.
Where a file lands in the workspace is recorded, so a later reply to its message can name it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from . import files
from .agents import Agent, Attachment
from .db.places import FilePlaceTable
from .intake import Incoming
from .matrix import Matrix
from .notices import Notices
from .part import Part


@dataclass(eq=False, kw_only=True)
class FileService(Part):
    """Files in (from a message) and out (from an answer), for the answer stage."""

    mx: Matrix
    notices: Notices
    places: FilePlaceTable | None = None  # where files landed, for replies (None: not kept)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def take(
        self, room_id: str, incoming: Incoming, agent: Agent | None
    ) -> Attachment | None:
        """The message's file, fetched into the workspace or into memory for an agent that
        takes files inline; None after telling the user why the file was refused."""
        content = incoming.file or {}
        try:
            # One download at a time per user: each sees what the others left of the quota.
            async with self._locks.setdefault(incoming.sender, asyncio.Lock()):
                attachment = await self._fetch(room_id, incoming, agent)
        except files.FileRefused as e:
            self.log.warning("File from %s in %s refused: %s", incoming.sender, room_id, e)
            await self.notices.send(
                room_id, e.message(self.settings().language), reply_to=incoming.event_id
            )
            return None
        if attachment is None:
            name = files.safe_name(str(content.get("filename") or content.get("body") or ""))
            await self.notices.say(
                room_id, "file.not_accepted", name=name, reply_to=incoming.event_id
            )
            return None
        self.log.info(
            "Received file %s from %s in %s",
            attachment.workspace_path or attachment.name, incoming.sender, room_id,
        )  # fmt: skip
        if attachment.workspace_path:
            await self._place(room_id, incoming.turn, attachment.workspace_path)
        return attachment

    async def _place(self, room_id: str, event_id: str, path: str) -> None:
        """Records where the file message ``event_id`` landed (a 🔁's file: its message's
        turn); a database that fails now costs a later reply the path, never the answer."""
        if self.places is None:
            return
        try:
            await self.places.put(room_id, event_id, path)
        except Exception as e:
            self.log.warning("Recording where the file of %s in %s landed failed: %s",
                             event_id, room_id, e)  # fmt: skip

    async def _fetch(
        self, room_id: str, incoming: Incoming, agent: Agent | None
    ) -> Attachment | None:
        settings = self.settings()
        content = incoming.file or {}
        if settings.workspace_root:
            return await files.save_incoming(
                self.mx, settings.workspace_root, incoming.sender, room_id, content,
                settings.max_file_bytes, quota_bytes=settings.workspace_quota_bytes,
                deadline_s=settings.download_timeout_s,
            )  # fmt: skip
        if agent is not None and agent.backend == "openai":
            return await files.fetch_inline(
                self.mx, content, settings.max_file_bytes, deadline_s=settings.download_timeout_s
            )
        return None

    async def send(self, room_id: str, user_id: str, paths: tuple[str, ...]) -> int:
        """Uploads the files the agent returned; how many went. Each refusal is said, the
        rest still go; past ``files.max_files_per_answer`` none is tried, and those left
        are named in one notice (an agent's 10,000 paths cost as much as its first few)."""
        settings = self.settings()
        most = settings.max_files_per_answer
        tried, left = paths[:most], len(paths) - min(len(paths), most)
        encrypt = bool(tried) and await self.mx.crypto.must_seal(room_id)
        sent = 0
        for rel_path in tried:
            try:
                if not settings.workspace_root:
                    raise files.FileRefused(
                        "file.missing", "no workspace root", path=files.shown_path(rel_path)
                    )
                await files.send_outgoing(
                    self.mx, room_id, settings.workspace_root, rel_path, settings.max_file_bytes,
                    user_id, encrypt=encrypt,
                )  # fmt: skip
                sent += 1
            except files.FileRefused as e:
                self.log.warning("Agent file %r refused in %s: %s", rel_path, room_id, e)
                await self.notices.send(room_id, e.message(settings.language))
        if left:
            self.log.warning("%d files of an answer in %s not sent: past %d", left, room_id, most)
            await self.notices.say(room_id, "file.not_sent", count=left, max=most)
        return sent
