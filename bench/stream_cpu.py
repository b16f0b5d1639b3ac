"""``python -m bench.stream_cpu``: the plugin's CPU seconds to stream one answer.

A 10 KB and a 12 KB answer (12 KB is where one event ends and streaming edits stop), and a
400,000-character Cyrillic one (the default ``max_answer_chars``, 800 KB: past one event after
its first 6,000 characters; issue 20's goal: at most 1 CPU-second), go through
``lambda_plugin.replies.StreamingReply`` in 4-character deltas, as a fast model sends them,
with no edit interval (every delta may be an edit) and a send that does nothing: what is left
is the plugin's own work per answer, sizing the growing text, rendering the edits its render
throttle lets through, and splitting the final answer. The text grows as the ``openai``
backend grows it (``text += delta``, the whole text so far passed on each time). Printed, and
written to bench/results/stream_cpu.json. No homeserver, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from lambda_plugin.replies import StreamingReply

RESULTS = Path(__file__).resolve().parent / "results"
# label -> (characters, language)
SIZES = {"10k": (10_000, "en"), "12k": (12_000, "en"), "400k_cyrillic": (400_000, "ru")}
DELTA_CHARS = 4
REPS = 3


BLOCKS = {
    "en": [
        "Here is what I found. The **main point** comes first, then the `details` follow.",
        "- one item with `code`\n- another item, *emphasised*\n- a third, plain one",
        "```python\ndef total(values):\n    return sum(v * 2 for v in values)\n```",
        "A longer paragraph goes on about the subject at some length, with a few clauses, "
        "a [link](https://example.org/page) and an ordinary sentence to end it.",
    ],
    "ru": [
        "Вот что я нашёл. **Главное** сначала, потом `подробности`.",
        "- первый пункт с `кодом`\n- второй пункт, *выделенный*\n- третий, простой",
        "```python\ndef total(values):\n    return sum(v * 2 for v in values)\n```",
        "Длинный абзац рассказывает о предмете подробно, с несколькими оборотами, "
        "[ссылкой](https://example.org/page) и обычным предложением в конце.",
    ],
}


def answer(chars: int, language: str = "en") -> str:
    """A Markdown answer of exactly ``chars`` characters (ASCII, or mostly Cyrillic: two bytes
    each): paragraphs of prose with some emphasis, inline code, a list and a code block, as
    models write them."""
    blocks = BLOCKS[language]
    text = ""
    index = 0
    while len(text) < chars:
        text += blocks[index % len(blocks)] + "\n\n"
        index += 1
    return text[:chars]


async def _send(content: dict[str, Any]) -> str:
    return "$event"


async def stream_once(text: str) -> tuple[float, int, int]:
    """CPU seconds to stream ``text`` and finish it; also the number of edits and of the
    messages the answer ends in."""
    deltas = [text[at : at + DELTA_CHARS] for at in range(0, len(text), DELTA_CHARS)]
    reply = StreamingReply(_send, interval_s=0)
    started = time.process_time()
    so_far = ""
    for delta in deltas:
        so_far += delta
        await reply.partial(so_far)
    messages = len(await reply.finish(so_far))
    return time.process_time() - started, reply.edits, messages


async def measure(reps: int = REPS) -> dict[str, Any]:
    """The median CPU seconds per answer of each size, over ``reps`` runs."""
    out: dict[str, Any] = {"delta_chars": DELTA_CHARS, "reps": reps}
    for label, (chars, language) in SIZES.items():
        text = answer(chars, language)
        runs = [await stream_once(text) for _ in range(reps)]
        out[f"cpu_s_{label}"] = round(statistics.median(run[0] for run in runs), 4)
        out[f"deltas_{label}"] = -(-chars // DELTA_CHARS)
        out[f"edits_{label}"] = runs[0][1]
        out[f"messages_{label}"] = runs[0][2]
        out[f"bytes_{label}"] = len(text.encode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_cpu")
    parser.add_argument("--reps", type=int, default=REPS, help="runs per size (median)")
    parser.add_argument("--out", type=Path, default=RESULTS / "stream_cpu.json")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.reps))
    figures["meta"] = {"python": platform.python_version(), "started": time.strftime("%F %T")}
    for label in SIZES:
        print(
            f"{label} answer: {figures[f'cpu_s_{label}']:.3f} CPU-s "
            f"({figures[f'deltas_{label}']} deltas, {figures[f'edits_{label}']} edits, "
            f"{figures[f'messages_{label}']} messages, {figures[f'bytes_{label}']:,} bytes)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
