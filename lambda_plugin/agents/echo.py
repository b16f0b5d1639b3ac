"""The embedded default agent: answers from the message itself, with no network.

It keeps history like a real agent, so ``!clear``, ``!save``, ``!load`` and ``!context``
show real effects without any agent deployed; and it counts a character as a token (the
message's in, the answer's out), so usage and quotas show without one too.
"""

from __future__ import annotations

from .base import AgentReply, AgentRequest, PartialCallback, StoreAgent, Usage


class EchoAgent(StoreAgent):
    backend = "echo"

    async def respond(
        self, request: AgentRequest, on_partial: PartialCallback | None = None
    ) -> AgentReply:
        # Its own earlier turn (asked again after a crash, edited) is not counted; one row of sums
        # is read, whatever the conversation's length.
        size = await self.store.history_size(request.platform_chat_id, request.turn)
        number = 1 + size.asked
        parts = [f"echo: {request.text}"]
        if request.attachments:
            parts.append(
                "\n".join(
                    f"- {file.name} ({file.mime_type}, {file.size} bytes): "
                    f"{file.workspace_path or 'inline'}"
                    for file in request.attachments
                )
            )
        parts.append(f"(message {number} in this conversation)")
        # Blank lines between the parts: the reply is rendered as Markdown.
        answer = "\n\n".join(parts)
        await self.remember(request, request.text, answer)
        return AgentReply(answer, usage=Usage(len(request.text), len(answer)))

    async def health(self) -> str | None:
        return None
