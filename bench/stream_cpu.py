"""``python -m bench.stream_cpu``: the plugin's CPU seconds to stream one answer.

A 10 KB and a 12 KB answer (12 KB is where one event ends and streaming edits stop) go through
``lambda_plugin.replies.StreamingReply`` in 4-character deltas, as a fast model sends them,
with no edit interval (every delta is an edit) and a send that does nothing: what is left is
the plugin's own work per answer, rendering and sizing the growing text. Printed, and written
to bench/results/stream_cpu.json. No homeserver, no network.
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
SIZES = {"10k": 10_000, "12k": 12_000}
DELTA_CHARS = 4
REPS = 3


def answer(chars: int) -> str:
    """A Markdown answer of exactly ``chars`` ASCII characters (bytes): paragraphs of prose
    with some emphasis, inline code, a list and a code block, as models write them."""
    blocks = [
        "Here is what I found. The **main point** comes first, then the `details` follow.",
        "- one item with `code`\n- another item, *emphasised*\n- a third, plain one",
        "```python\ndef total(values):\n    return sum(v * 2 for v in values)\n```",
        "A longer paragraph goes on about the subject at some length, with a few clauses, "
        "a [link](https://example.org/page) and an ordinary sentence to end it.",
    ]
    text = ""
    index = 0
    while len(text) < chars:
        text += blocks[index % len(blocks)] + "\n\n"
        index += 1
    return text[:chars]


async def _send(content: dict[str, Any]) -> str:
    return "$event"


async def stream_once(text: str) -> tuple[float, int]:
    """CPU seconds to stream ``text`` and finish it; also the number of edits sent."""
    reply = StreamingReply(_send, interval_s=0)
    started = time.process_time()
    for end in range(DELTA_CHARS, len(text) + DELTA_CHARS, DELTA_CHARS):
        await reply.partial(text[:end])
    await reply.finish(text)
    return time.process_time() - started, reply.edits


async def measure(reps: int = REPS) -> dict[str, Any]:
    """The median CPU seconds per answer of each size, over ``reps`` runs."""
    out: dict[str, Any] = {"delta_chars": DELTA_CHARS, "reps": reps}
    for label, chars in SIZES.items():
        text = answer(chars)
        runs = [await stream_once(text) for _ in range(reps)]
        out[f"cpu_s_{label}"] = round(statistics.median(cpu for cpu, _ in runs), 4)
        out[f"deltas_{label}"] = -(-chars // DELTA_CHARS)
        out[f"edits_{label}"] = runs[0][1]
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
            f"({figures[f'deltas_{label}']} deltas, {figures[f'edits_{label}']} edits)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
