"""Splitting long answers and throttling stream edits."""

from __future__ import annotations

import json
import time

from lambda_plugin.replies import (
    CHUNK_BYTES,
    MAX_EVENT_JSON,
    STREAM_CURSOR,
    StreamingReply,
    edit_content,
    event_size,
    split_answer,
    split_text,
)


def test_short_text_is_one_piece() -> None:
    assert split_text("hello") == ["hello"]


def test_long_text_is_split_at_paragraphs_and_nothing_is_lost() -> None:
    text = "\n\n".join(f"paragraph {i} " + "word " * 300 for i in range(60))
    pieces = split_text(text)
    assert len(pieces) > 1
    assert all(len(p.encode()) <= CHUNK_BYTES for p in pieces)
    assert all(p.startswith("paragraph") for p in pieces)  # cut between paragraphs
    assert "".join(pieces).split() == text.split()


def test_multibyte_text_respects_the_byte_budget() -> None:
    text = "ж" * 20_000  # 2 bytes each, no spaces at all
    pieces = split_text(text)
    assert all(len(p.encode()) <= CHUNK_BYTES for p in pieces)
    assert "".join(pieces) == text


def test_code_block_cut_in_two_is_closed_and_reopened() -> None:
    code = "\n".join(f"line {i} = {i} * 2" for i in range(2000))
    text = "Here:\n\n```python\n" + code + "\n```\n"
    pieces = split_text(text)
    assert len(pieces) > 1
    for piece in pieces:
        assert piece.count("```") % 2 == 0, piece[:80]
    assert pieces[1].startswith("```python\n")


def test_edit_content_replaces_the_original() -> None:
    content = edit_content("$orig", "new **text**")
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert content["m.new_content"]["body"] == "new **text**"
    assert "<strong>text</strong>" in content["m.new_content"]["formatted_body"]


async def test_stream_edits_are_throttled() -> None:
    sent: list[dict] = []
    now = [0.0]

    async def send(content: dict) -> str:
        sent.append(content)
        return f"$e{len(sent)}"

    reply = StreamingReply(send, interval_s=1.0, clock=lambda: now[0])
    for i in range(1, 21):  # 20 partials, 0.25 s apart: 5 s in all
        now[0] = i * 0.25
        await reply.partial("x" * i)
    # The first partial sends a message; then at most one edit per second.
    assert len(sent) == 1 + 4
    await reply.finish("final answer")
    assert sent[-1]["m.new_content"]["body"] == "final answer"
    assert sent[-1]["m.relates_to"]["event_id"] == "$e1"


def test_a_long_line_starting_with_backticks_is_not_a_fence() -> None:
    text = "```" + "x" * 20_000
    pieces = split_text(text)
    assert len(pieces) <= 3
    assert "".join(pieces).replace("```", "").count("x") == 20_000


def test_every_piece_fits_one_event_as_sent() -> None:
    # Quotes and ampersands grow a lot when rendered to HTML and escaped in JSON.
    text = "\n\n".join('"&<b>" & "quoted" ' * 40 for _ in range(200))
    pieces = split_answer(text)
    assert all(event_size(p) <= MAX_EVENT_JSON for p in pieces)
    assert "".join(pieces).split() == text.split()


def _json_size(content: dict) -> int:
    return len(json.dumps(content))


def _answer(size: int) -> str:
    """An ordinary Markdown answer of about ``size`` bytes: paragraphs, lists, code, links."""
    block = (
        "Here is **what I found** about `files`, with a [link](https://example.org/a).\n\n"
        "- first point, *emphasised*\n- second point\n\n"
        "```python\nprint('hello')\n```\n\n"
    )
    return (block * (size // len(block) + 1))[:size]


async def test_the_first_partial_is_sent_at_once() -> None:
    sent: list[dict] = []

    async def send(content: dict) -> str:
        sent.append(content)
        return "$first"

    reply = StreamingReply(send, interval_s=3600.0, clock=lambda: 5.0)
    await reply.partial("Hel")
    assert [c["body"] for c in sent] == ["Hel" + STREAM_CURSOR]  # no waiting for the interval
    await reply.partial("Hello")
    assert len(sent) == 1  # the edits wait for it


async def test_streaming_cost_per_delta_does_not_grow_with_the_answer() -> None:
    async def send(content: dict) -> str:
        return "$e"

    text = _answer(12_000)
    reply = StreamingReply(send, interval_s=0.0)
    start = time.process_time()
    for end in range(4, len(text) + 1, 4):
        await reply.partial(text[:end])
        # checked as it goes: before the fix this took over a minute
        assert time.process_time() - start < 0.3, f"{end} bytes streamed"


async def test_no_streamed_event_exceeds_the_limit_for_adversarial_content() -> None:
    sent: list[dict] = []
    now = [0.0]

    async def send(content: dict) -> str:
        sent.append(content)
        return "$e1"

    url = "https://example.org/" + "u" * 900
    answers = {
        # escapes to 4-5 times its size in HTML
        "escaping": '<&>"' * 3000,
        # a reference link used over and over: 6 bytes of Markdown, 900 of HTML each
        "references": f"[r]: {url}\n\n" + "[x][r] " * 300,
    }
    for kind, text in answers.items():
        sent.clear()
        reply = StreamingReply(send, interval_s=1.0, clock=lambda: now[0])
        for end in range(50, len(text) + 1, len(text) // 12):  # a dozen sizes up to all of it
            now[0] += 2.0  # the interval has always passed: each partial is tried
            await reply.partial(text[:end])
        await reply.finish(text)
        assert sent, kind
        assert max(_json_size(c) for c in sent) <= MAX_EVENT_JSON, kind
