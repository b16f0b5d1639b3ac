"""Splitting long answers and throttling stream edits."""

from __future__ import annotations

from lambda_plugin.replies import (
    CHUNK_BYTES,
    MAX_EVENT_JSON,
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
