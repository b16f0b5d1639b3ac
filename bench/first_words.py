"""first_words: with a streaming agent whose first token comes a fixed delay after it is asked,
the time from a user's send to the first text of the answer arriving in the user's own sync
loop, minus that delay. Interleaved with the plain-user round trip of ``latency``.

The agent (``agent_server.StreamingAgent``, an OpenAI-compatible server in this process) is
the ``openai`` backend with ``stream: true``, registered in the instance config; the room is
switched to it with ``!agent``. ``replies.stream_edit_interval_s`` stays at its default
(1.0 s) and the answer streams on for longer than that after its first token, so a first
message that waited for the edit throttle would show as a second or more.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from devstack.matrix import Event, MatrixUser
from lambda_plugin.replies import STREAM_CURSOR

from .common import (
    CpuMeter,
    LogTail,
    SyncLoop,
    homeserver_requests,
    median,
    percentile,
    wait_idle,
)
from .env import STREAM_AGENT, BenchStack
from .latency import PlainPair, onboard

SAMPLE_TIMEOUT = 60
WARMUP = 3


def _is_edit(event: Event) -> bool:
    relates = event.get("content", {}).get("m.relates_to") or {}
    return isinstance(relates, dict) and relates.get("rel_type") == "m.replace"


async def _say(loop: SyncLoop, user: MatrixUser, room: str, bot: str, body: str, want: str):
    """Sends ``body`` and waits for the bot's message containing ``want`` (a command's answer)."""
    after = len(loop.events(room))
    await user.send_text(room, body)

    def check() -> str | None:
        for _, event in loop.events(room)[after:]:
            text = event.get("content", {}).get("body", "")
            if event.get("sender") == bot and want in text:
                return text
        return None

    return await loop.wait(check, SAMPLE_TIMEOUT, f"the bot's answer to {body!r}")


async def stream_exchange(
    stack: BenchStack, loop: SyncLoop, user: MatrixUser, room: str, token: str
) -> dict[str, Any]:
    """One message to the streaming agent: when its first text and its whole answer arrived
    in ``user``'s sync, and when the agent was asked and wrote its first token (all
    monotonic seconds on this process's clock)."""
    bot = stack.bot_id
    after = len(loop.events(room))
    sent = time.monotonic()
    await user.send_text(room, f"ping {token}")

    def first() -> tuple[float, Event] | None:
        for arrived, event in loop.events(room)[after:]:
            if event.get("sender") != bot or event.get("type") != "m.room.message":
                continue
            if _is_edit(event):
                continue
            body = event.get("content", {}).get("body", "")
            if token in body:
                return arrived, event
            raise RuntimeError(f"the bot said something else: {body[:200]!r}")
        return None

    arrived, event = await loop.wait(first, SAMPLE_TIMEOUT, f"the first words for {token}")
    first_body = event.get("content", {}).get("body", "")
    partial = first_body.endswith(STREAM_CURSOR)
    whole = "".join(stack.agent.answer(token))

    def complete() -> float | None:
        if not partial:
            return arrived
        for at, e in loop.events(room)[after:]:
            new = e.get("content", {}).get("m.new_content") or {}
            relates = e.get("content", {}).get("m.relates_to") or {}
            if (
                e.get("sender") == bot
                and relates.get("event_id") == event.get("event_id")
                and new.get("body") == whole
            ):
                return at
        return None

    done = await loop.wait(complete, SAMPLE_TIMEOUT, f"the whole answer for {token}")
    timing = stack.agent.timings.get(token)
    if timing is None or timing.first_token is None:
        raise RuntimeError(f"the agent was never asked about {token}")
    return {
        "sent": sent,
        "first": arrived,
        "done": done,
        "asked": timing.request,
        "first_token": timing.first_token,
        "partial": partial,
    }


async def run(stack: BenchStack, samples: int, log) -> dict[str, Any]:
    agent = stack.agent
    delay_ms = agent.first_token_s * 1000
    config = await stack.instance_config()
    interval = (config.get("replies") or {}).get("stream_edit_interval_s")
    user = await stack.user(stack.unique("words"))
    user_loop = SyncLoop(user)
    await user_loop.start()
    pair = PlainPair(stack, "wraw")  # the physical limit, as in latency
    runs: list[dict[str, Any]] = []
    raw_ms: list[float] = []
    try:
        _, _, room = await onboard(stack, user, user_loop)
        await _say(user_loop, user, room, stack.bot_id, f"!agent {STREAM_AGENT}", STREAM_AGENT)
        await pair.start()
        await wait_idle(stack.pids(), timeout=30)
        hs_log = stack.synapse.dir / "homeserver.log"
        hs_mark = LogTail(hs_log).mark()
        meter = CpuMeter(stack.pids()).start()
        for i in range(WARMUP + samples):  # interleaved: both see the same conditions
            token = f"{i}-{uuid.uuid4().hex[:8]}"
            got = await stream_exchange(stack, user_loop, user, room, "fw-" + token)
            raw = await pair.exchange("r" + token)
            if i >= WARMUP:
                runs.append(got)
                raw_ms.append(raw)
        cpu = meter.stop()
        await asyncio.sleep(0.5)  # Synapse's access log of the last requests
        total = WARMUP + samples
        bot_requests = {
            name: round(v["count"] / total, 2)
            for name, v in homeserver_requests(hs_log, hs_mark, stack.bot_id).items()
        }
    finally:
        await user_loop.stop()
        await pair.stop()

    def ms(key: str, start: str) -> list[float]:
        return [(r[key] - r[start]) * 1000 for r in runs]

    words = [v - delay_ms for v in ms("first", "sent")]
    to_agent = ms("asked", "sent")  # the user's send until the agent is asked
    after_token = ms("first", "first_token")  # the first token until it is on screen
    whole = [v - delay_ms for v in ms("done", "sent")]
    p50, p95 = median(words), percentile(words, 95)
    raw_p50 = median(raw_ms)
    log(
        f"first_words: p50 {p50:.1f}ms p95 {p95:.1f}ms past the "
        f"{delay_ms:.0f}ms first-token delay (raw round trip p50 {raw_p50:.1f}ms)"
    )
    return {
        "samples": len(words),
        "p50_ms": round(p50, 1),
        "p95_ms": round(p95, 1),
        "raw_p50_ms": round(raw_p50, 1),
        "raw_p95_ms": round(percentile(raw_ms, 95), 1),
        "overhead_vs_raw_p50_ms": round(p50 - raw_p50, 1),
        "first_token_delay_ms": round(delay_ms),
        "stream_edit_interval_s": interval,
        "first_was_partial": sum(1 for r in runs if r["partial"]),
        "stream_after_first_token_s": round(agent.gap_s * (agent.pieces - 1), 2),
        "min_ms": round(min(words), 1),
        "max_ms": round(max(words), 1),
        "p90_ms": round(percentile(words, 90), 1),
        # where the time goes: before the agent is asked, and after its first token
        "send_to_agent_p50_ms": round(median(to_agent), 1),
        "first_token_to_screen_p50_ms": round(median(after_token), 1),
        "first_token_to_screen_p95_ms": round(percentile(after_token, 95), 1),
        "whole_answer_p50_ms": round(median(whole), 1),
        # a sample and its plain round trip together
        "cpu_ms_per_pair": {
            k.removesuffix("_cpu_s"): round(1000 * v / (WARMUP + samples), 1)
            for k, v in cpu.items()
        },
        "bot_requests_per_sample": bot_requests,
    }
