"""faults: users keep talking to a slow streaming agent while the stack is broken under them.

U users, each onboarded with a chat room of its own switched (``!agent``) to a slow
``openai``-backend agent (``SlowAgent`` below, in the bench's process: each answer streams for
about 1.5 s), send a message every ``interval`` seconds, each text unique (``f-<room>-<n>``).
Meanwhile faults come at seeded random moments (``random.Random(seed)``), one after another,
each kind ``per_kind`` times in a shuffled order:

- ``maubot_kill``: SIGKILL of the maubot process (no ``stop()`` runs), started again after a
  second or two and logged in;
- ``instance_restart``: the plugin instance stopped and started through maubot's management
  API, a few seconds apart;
- ``synapse_restart``: Synapse stopped (SIGTERM), down for 5-15 s, started again;
- ``postgres_restart`` (PostgreSQL engine only): ``pg_ctl -m immediate`` stop, then start.

A user's send that fails (Synapse down, or stopping) is retried with the same transaction id
until the homeserver accepts it (bounded); it counts as sent only then, with its event id. The
devstack calls that block (a server's start and stop) run in threads, so the users keep their
pace through all of it.

When the faults are over (and at least ``messages`` were sent), the rooms are read through
``/messages`` until every message has its complete answer or ``wait_s`` have passed since the
last fault's recovery or the last send. An answer is a notice of the bot whose final form
(the last ``m.replace`` edit, else the notice itself) carries ``ai.lambda.matrix.answers``
naming the user's event and whose text no longer ends with the streaming cursor; its time is
the ``origin_server_ts`` of that final form. Each message is attributed to a fault when it was
meant to be sent (its scheduled time) between the fault's start and the moment the faulted
component was back ("recovered"), or in the ``IN_FLIGHT_S`` before the start without a
complete answer by then; else to ``none``. Per kind: sent, answered (exactly one complete
answer), lost (none), twice (two or more distinct answer events), out of order (a message
whose answer comes after the answer of a later message of its room), and per fault the time
from recovery to the last answer of its messages (a fault with a lost message counts the time
until the end of the wait: a lower bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from devstack.matrix import Event, MatrixUser
from lambda_plugin.replies import STREAM_CURSOR

from .agent_server import LocalAgent, last_user_text
from .common import SYNC_FILTER, SyncLoop, homeserver_requests, log_time, median, percentile
from .env import BenchStack
from .first_words import _say
from .latency import onboard

ANSWERS = "ai.lambda.matrix.answers"  # what the bot's answer says it answers
ANSWERING = "ai.lambda.matrix.answering"  # a streamed answer's notice while it streams
AGENT = "bench_faults"
KINDS = ("maubot_kill", "instance_restart", "synapse_restart", "postgres_restart")
TEXT = re.compile(r"\bf-\d+-\d+\b")
IN_FLIGHT_S = 10.0  # a message this long before a fault, unanswered when it hit, is its too
SEND_TIMEOUT_S = 15.0  # one attempt of a send
SEND_GIVE_UP_S = 240.0  # a send not accepted by then is given up (counted, never sent)
SETTLE_S = 5.0  # after every message has its answer, for late duplicates
TAIL_S = 10.0  # the users go on sending this long after the last fault's recovery
# The next fault waits (this long at most past the recovery) until the messages the last one
# hit are answered, so that each fault's recovery is its own, not stretched by the next one.
# A fault not caught up by then has missed the recovery goal (15 s) already.
CAUGHT_UP_BOUND_S = 15.0
CATCH_UP_MINUTES = 10  # the plugin's default (the bench stack's 0.5 is for reconcile)
READY_NEEDLES = {  # maubot log lines telling when the plugin was serving again
    "maubot_kill": "Reconciled: ",
    "instance_restart": "Reconciled: ",
    "synapse_restart": "Sync error resolved",
}


# The agent ---------------------------------------------------------------------------------


@dataclass
class SlowAgent(LocalAgent):
    """An OpenAI-compatible chat completions server that streams its answer slowly: the role
    at once, the first piece ``first_token_s`` later, then ``pieces - 1`` more ``gap_s``
    apart. The answer names the message (``f-<room>-<n>``) it was asked about; ``asked``
    counts the requests per message (re-asked after a crash: more than one)."""

    first_token_s: float = 0.3
    pieces: int = 5
    gap_s: float = 0.3
    model: str = "bench-faults"
    asked: Counter = field(default_factory=Counter)
    cut: int = 0  # streams the plugin went away from (maubot killed, say)
    base_url: str = ""

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None

    def answer(self, text: str) -> str:
        return f"Answer to {text}:" + "".join(
            f" part {i} of the slow stream." for i in range(1, self.pieces)
        )

    def pieces_of(self, text: str) -> list[str]:
        whole = self.answer(text)
        size = -(-len(whole) // self.pieces)
        return [whole[i : i + size] for i in range(0, len(whole), size)]

    @property
    def seconds(self) -> float:
        return self.first_token_s + self.gap_s * (self.pieces - 1)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.json()
        found = TEXT.search(last_user_text(body))
        text = found.group(0) if found else "an unknown message"
        self.asked[text] += 1
        pieces = self.pieces_of(text)
        return await self._answer(request, body, arrived, pieces, cut=self._cut)

    def _cut(self) -> None:  # the plugin went away mid-answer (maubot killed, say)
        self.cut += 1


# Sending -----------------------------------------------------------------------------------


@dataclass
class Sent:
    """One user message: meant to be sent at ``scheduled`` (epoch seconds), accepted by the
    homeserver at ``accepted`` as ``event_id`` after ``attempts`` tries."""

    room_index: int
    n: int
    text: str
    room_id: str
    scheduled: float
    accepted: float | None = None
    event_id: str | None = None
    attempts: int = 0
    error: str | None = None


async def _send_once(user: MatrixUser, room_id: str, text: str, txn: str) -> str:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/{quote(txn)}"
    async with user.http.put(
        user.hs + path,
        json={"msgtype": "m.text", "body": text},
        headers={"Authorization": f"Bearer {user.token}"},
        timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S),
    ) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200 or not isinstance(data, dict) or "event_id" not in data:
            raise RuntimeError(f"send answered {resp.status}: {str(data)[:200]}")
        return data["event_id"]


async def send_until_accepted(user: MatrixUser, msg: Sent) -> None:
    """Sends ``msg`` until the homeserver accepts it: always the same transaction id, so a
    try whose answer was lost (Synapse stopping) never makes a second event."""
    txn = f"fault-{msg.room_index}-{msg.n}-{int(msg.scheduled * 1000)}"
    deadline = time.monotonic() + SEND_GIVE_UP_S
    while True:
        msg.attempts += 1
        try:
            msg.event_id = await _send_once(user, msg.room_id, msg.text, txn)
            msg.accepted = time.time()
            msg.error = None
            return
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError) as e:
            msg.error = f"{type(e).__name__}: {e}"[:200]
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.5)


# Faults ------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    index: int
    planned_down_s: float
    start: float = 0.0  # epoch seconds: the fault began
    recovered: float | None = None  # the faulted component was back
    log_mark: int = 0  # maubot's log size at the start
    ready: float | None = None  # the plugin's log says it serves again (see READY_NEEDLES)
    error: str | None = None


def plan_faults(rng: random.Random, kinds: list[str], per_kind: int) -> list[Fault]:
    order = [kind for kind in kinds for _ in range(per_kind)]
    rng.shuffle(order)
    down = {
        "maubot_kill": (0.5, 3.0),  # dead before it is started again
        "instance_restart": (0.5, 5.0),  # stopped before it is started again
        "synapse_restart": (5.0, 15.0),  # down between its stop and its start
        "postgres_restart": (0.0, 0.0),  # Postgres.restart(): immediate stop, start
    }
    return [Fault(kind, i, round(rng.uniform(*down[kind]), 2)) for i, kind in enumerate(order)]


async def _in_thread(fn) -> Any:
    """``fn()`` in a thread; a cancellation waits for it to end, so a server being started or
    stopped is never left half done behind the clean-up (nor started after it)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


class Injector:
    """Breaks one component and brings it back; ``ensure_up`` restores whatever is still
    down, whatever went wrong."""

    def __init__(self, stack: BenchStack) -> None:
        assert stack.dep is not None
        self.stack = stack
        self.dep = stack.dep
        self.maubot = stack.dep.maubot
        self.synapse = stack.synapse
        self.postgres = stack.postgres

    async def inject(self, fault: Fault) -> None:
        fault.log_mark = self.maubot.log.stat().st_size if self.maubot.log.exists() else 0
        fault.start = time.time()
        try:
            if fault.kind == "maubot_kill":
                # Deployment.kill_server() would run Maubot.start() on the event loop: its
                # readiness wait (time.sleep) would stop the users' sends meanwhile.
                await self.maubot.close()
                self.maubot.kill()
                await asyncio.sleep(fault.planned_down_s)
                await _in_thread(self.maubot.start)
                await self.maubot.login()
            elif fault.kind == "instance_restart":
                await self.maubot.set_started(self.dep.instance_id, False)
                await asyncio.sleep(fault.planned_down_s)
                await self.maubot.set_started(self.dep.instance_id, True)
            elif fault.kind == "synapse_restart":
                await _in_thread(self.synapse.stop)
                await asyncio.sleep(fault.planned_down_s)
                await _in_thread(self.synapse.start)
            elif fault.kind == "postgres_restart":
                assert self.postgres is not None
                await _in_thread(self.postgres.restart)
            else:
                raise ValueError(f"unknown fault {fault.kind}")
            fault.recovered = time.time()
        except Exception as e:
            fault.error = f"{type(e).__name__}: {e}"[:300]
            await self.ensure_up()
            fault.recovered = time.time()

    async def ensure_up(self) -> list[str]:
        """Starts again whatever is down; returns what it had to start."""
        started = []
        if self.synapse.proc is None or self.synapse.proc.poll() is not None:
            await _in_thread(self.synapse.start)
            started.append("synapse")
        if self.postgres is not None and not await _in_thread(self.postgres._ready):
            await _in_thread(self.postgres.start)
            started.append("postgres")
        if self.maubot.proc is None or self.maubot.proc.poll() is not None:
            await self.maubot.close()
            self.maubot.proc = None
            await _in_thread(self.maubot.start)
            started.append("maubot")
        await self.maubot.login()
        instance = await self.maubot.get_instance(self.dep.instance_id)
        if not instance.get("started"):
            await self.maubot.set_started(self.dep.instance_id, True)
            started.append("instance")
        return started


# Reading the rooms -------------------------------------------------------------------------


class Watcher:
    """A user's client syncing through everything (an error is retried, not fatal): which
    messages the bot has answered completely so far, as the client sees it. Only to know when
    to go on; the figures come from ``/messages`` at the end."""

    def __init__(self, user: MatrixUser, bot_id: str) -> None:
        self.user = user
        self.bot_id = bot_id
        self.answered: set[str] = set()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        flt = json.dumps(SYNC_FILTER)
        since: str | None = None
        while True:
            params = {"timeout": "5000" if since else "0", "filter": flt}
            if since:
                params["since"] = since
            try:
                data = await self.user.request("GET", "/_matrix/client/v3/sync", **params)
            except Exception:  # Synapse down or stopping: a client tries again
                await asyncio.sleep(0.5)
                continue
            since = data.get("next_batch", since)
            for room in (data.get("rooms") or {}).get("join", {}).values():
                for event in (room.get("timeline") or {}).get("events", []):
                    if event.get("sender") != self.bot_id:
                        continue
                    content = event.get("content") or {}
                    final = content.get("m.new_content") or content
                    named = _named(content) or _named(final)
                    if named and not str(final.get("body", "")).endswith(STREAM_CURSOR):
                        self.answered.add(named)


async def read_room(user: MatrixUser, room_id: str, since_ms: int) -> list[Event]:
    """The room's messages from ``since_ms`` on, oldest first, through ``/messages``."""
    events: list[Event] = []
    token = None
    flt = json.dumps({"types": ["m.room.message"]})
    while True:
        params = {"dir": "b", "limit": "500", "filter": flt}
        if token:
            params["from"] = token
        data = await user.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/messages", **params
        )
        chunk = data.get("chunk") or []
        events.extend(chunk)
        token = data.get("end")
        if not chunk or not token or min(e.get("origin_server_ts", 0) for e in chunk) < since_ms:
            break
    events.reverse()
    return [e for e in events if e.get("origin_server_ts", 0) >= since_ms]


@dataclass
class Answer:
    """A notice of the bot (with its edits) in its final form."""

    event_id: str
    position: int  # of the notice in the room's timeline
    text: str
    answers: str | None  # the message its final form names
    answering: str | None  # the message its notice said it was working on
    at: float  # epoch seconds of its final form

    @property
    def complete(self) -> bool:
        return not self.text.endswith(STREAM_CURSOR)


def answers_in(events: list[Event], bot_id: str) -> list[Answer]:
    """The bot's notices in the room, each in its final form, in timeline order."""
    found: dict[str, Answer] = {}
    for position, event in enumerate(events):
        if event.get("sender") != bot_id:
            continue
        content = event.get("content") or {}
        relates = content.get("m.relates_to") or {}
        at = event.get("origin_server_ts", 0) / 1000
        if isinstance(relates, dict) and relates.get("rel_type") == "m.replace":
            target = found.get(str(relates.get("event_id")))
            if target is None:
                continue
            new = content.get("m.new_content") or {}
            target.text = str(new.get("body", content.get("body", "")))
            target.answers = _named(content) or _named(new)
            target.at = at
            continue
        found[event["event_id"]] = Answer(
            event_id=event["event_id"],
            position=position,
            text=str(content.get("body", "")),
            answers=_named(content),
            answering=content.get(ANSWERING) if isinstance(content.get(ANSWERING), str) else None,
            at=at,
        )
    return list(found.values())


def _named(content: Any) -> str | None:
    value = content.get(ANSWERS) if isinstance(content, dict) else None
    return value if isinstance(value, str) else None


# Figures -----------------------------------------------------------------------------------


def analyze(
    sent: list[Sent],
    faults: list[Fault],
    rooms: dict[str, list[Event]],
    bot_id: str,
    agent: SlowAgent,
    read_at: float,
) -> dict[str, Any]:
    """Every figure from the messages sent, the faults and the rooms as read at ``read_at``."""
    ok = [m for m in sent if m.event_id]
    by_id = {m.event_id: m for m in ok}
    complete: dict[str, list[Answer]] = {}  # message event id -> its complete answers
    dangling = interrupted = unnamed = wrong = errors = 0
    error_examples: list[str] = []
    answer_order: dict[str, list[str]] = {}  # room -> message ids in the order answered
    user_pos: dict[str, int] = {}
    texts: Counter = Counter()
    for room_id, events in rooms.items():
        for position, event in enumerate(events):
            body = (event.get("content") or {}).get("body")
            if event.get("sender") != bot_id and isinstance(body, str) and TEXT.fullmatch(body):
                texts[body] += 1
                user_pos[event["event_id"]] = position
        order = answer_order.setdefault(room_id, [])
        for answer in answers_in(events, bot_id):
            if not answer.complete:
                if answer.answering in by_id:
                    dangling += 1
                continue
            if answer.answers not in by_id:
                if answer.answering in by_id:
                    interrupted += 1  # a streamed notice ended without being the answer
                elif answer.text.startswith("Answer to "):
                    unnamed += 1
                continue
            msg = by_id[answer.answers]
            complete.setdefault(answer.answers, []).append(answer)
            if answer.text == agent.answer(msg.text):
                pass
            elif answer.text.startswith("Answer to "):
                wrong += 1
            else:
                errors += 1
                error_examples.append(answer.text[:200])
            if len(complete[answer.answers]) == 1:
                order.append(answer.answers)
    out_of_order: set[str] = set()
    disorder_examples: list[dict[str, str]] = []
    for order in answer_order.values():
        latest, latest_id = -1, ""
        for event_id in order:
            position = user_pos.get(event_id, -1)
            if position < latest:
                out_of_order.add(event_id)
                disorder_examples.append(
                    {"text": by_id[event_id].text, "answered_after": by_id[latest_id].text}
                )
            if position > latest:
                latest, latest_id = position, event_id

    def answered_at(m: Sent) -> float | None:
        got = complete.get(m.event_id or "")
        return min(a.at for a in got) if got else None

    def window(m: Sent) -> int | None:
        at = answered_at(m)
        for f in faults:
            end = f.recovered if f.recovered is not None else read_at
            if f.start <= m.scheduled <= end:
                return f.index
            if f.start - IN_FLIGHT_S <= m.scheduled < f.start and (at is None or at > f.start):
                return f.index
        return None

    windows = {m.event_id: window(m) for m in ok}
    per_fault: list[dict[str, Any]] = []
    for f in faults:
        mine = [m for m in ok if windows[m.event_id] == f.index]
        times = [answered_at(m) for m in mine]
        lost = sum(1 for t in times if t is None)
        recovered = f.recovered if f.recovered is not None else read_at
        if not mine:
            recovery = None
        elif lost:
            recovery = read_at - recovered  # a lower bound: never recovered while watched
        else:
            recovery = max(0.0, max(t for t in times if t is not None) - recovered)
        per_fault.append(
            {
                "index": f.index,
                "kind": f.kind,
                "down_s": round(recovered - f.start, 2),
                "planned_down_s": f.planned_down_s,
                "ready_after_recovery_s": round(f.ready - recovered, 2) if f.ready else None,
                "messages": len(mine),
                "lost": lost,
                "recovery_s": None if recovery is None else round(recovery, 2),
                # the message answered last (or one never answered)
                "slowest": max(mine, key=lambda m: answered_at(m) or math.inf).text
                if mine
                else None,
                "error": f.error,
            }
        )

    def counts(kind: str | None) -> dict[str, Any]:
        if kind is None:
            mine = [m for m in ok if windows[m.event_id] is None]
        else:
            mine = [m for m in ok if (w := windows[m.event_id]) is not None
                    and faults[w].kind == kind]  # fmt: skip
        answers = [len(complete.get(m.event_id or "", [])) for m in mine]
        entry: dict[str, Any] = {
            "sent": len(mine),
            "answered": sum(1 for a in answers if a == 1),
            "lost": sum(1 for a in answers if a == 0),
            "twice": sum(1 for a in answers if a >= 2),
            "out_of_order": sum(1 for m in mine if m.event_id in out_of_order),
        }
        if kind is not None:
            done = [p for p in per_fault if p["kind"] == kind]
            rec = [p["recovery_s"] for p in done if p["recovery_s"] is not None]
            entry["faults"] = len(done)
            entry["unrecovered"] = sum(1 for p in done if p["lost"])
            entry["recovery_p95_s"] = round(percentile(rec, 95), 2) if rec else None
            entry["recovery_max_s"] = round(max(rec), 2) if rec else None
            entry["down_p50_s"] = round(median([p["down_s"] for p in done]), 2) if done else None
        return entry

    kinds = list(dict.fromkeys(f.kind for f in faults))
    by_kind = {kind: counts(kind) for kind in kinds}
    by_kind["none"] = counts(None)
    total = {k: sum(v[k] for v in by_kind.values())
             for k in ("sent", "answered", "lost", "twice", "out_of_order")}  # fmt: skip
    recoveries = [p["recovery_s"] for p in per_fault if p["recovery_s"] is not None]
    recovered = [
        p["recovery_s"] for p in per_fault if p["recovery_s"] is not None and not p["lost"]
    ]
    lost_examples: dict[str, list[dict[str, Any]]] = {}  # a few of each window
    first = min((m.scheduled for m in sent), default=0.0)
    for m in ok:
        if not complete.get(m.event_id or ""):
            w = windows[m.event_id]
            where = lost_examples.setdefault(faults[w].kind if w is not None else "none", [])
            if len(where) < 5:
                where.append({"text": m.text, "sent_s": round(m.scheduled - first, 1)})
    return {
        "messages": total["sent"],
        "answered": total["answered"],
        "lost": total["lost"],
        "twice": total["twice"],
        "out_of_order": total["out_of_order"],
        "fault_count": len(faults),
        "faults_per_kind_min": min((by_kind[k]["faults"] for k in kinds), default=0),
        "recovery_p95_s": round(percentile(recoveries, 95), 2) if recoveries else None,
        "recovery_max_s": round(max(recoveries), 2) if recoveries else None,
        "unrecovered_faults": sum(1 for p in per_fault if p["lost"]),
        # the same over the faults whose messages were all answered
        "recovered_p95_s": round(percentile(recovered, 95), 2) if recovered else None,
        # what else the rooms show
        "error_answers": errors,  # a failure notice naming the message, not the agent's text
        "wrong_answers": wrong,  # the agent's answer to another message naming this one
        "dangling_partials": dangling,  # a streamed notice left ending with the cursor
        "interrupted_partials": interrupted,  # one ended (cut off, say) but not the answer
        "unnamed_answers": unnamed,  # an agent's answer naming no message sent
        "duplicate_user_messages": sum(n - 1 for n in texts.values() if n > 1),
        "not_sent": sum(1 for m in sent if not m.event_id),
        "send_retries": sum(m.attempts - 1 for m in ok),
        "asked_more_than_once": sum(1 for n in agent.asked.values() if n > 1),
        "agent_streams_cut": agent.cut,
        # one line per kind for the table (by_kind has the figures)
        **{f"kind_{kind}": _summary(v) for kind, v in by_kind.items()},
        "by_kind": by_kind,
        "per_fault": per_fault,
        "lost_examples": lost_examples,
        "error_answer_examples": list(dict.fromkeys(error_examples))[:5],
        "out_of_order_examples": disorder_examples[:10],
    }


def _summary(entry: dict[str, Any]) -> str:
    """A kind's counts, short enough for a cell of the table."""
    text = (f"{entry['sent']} sent {entry['answered']} ok {entry['lost']} lost "
            f"{entry['twice']} twice {entry['out_of_order']} disorder")  # fmt: skip
    if "faults" in entry:
        text = f"{entry['faults']}x: {text}"
        if entry["recovery_p95_s"] is not None:
            text += f", p95 {entry['recovery_p95_s']:g} s"
    return text


def _ready_times(path, faults: list[Fault]) -> None:
    """When the plugin served again after each fault, from maubot's log (the first line that
    says so after the fault's start)."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    for i, f in enumerate(faults):
        needle = READY_NEEDLES.get(f.kind)
        if needle is None:
            continue
        # up to the next fault of the same kind (mautrix's sync may resume after the next
        # fault of another kind began)
        later = [g.log_mark for g in faults[i + 1 :] if g.kind == f.kind]
        end = later[0] if later else len(data)
        for raw in data[f.log_mark : end].split(b"\n"):
            line = raw.decode(errors="replace")
            if needle in line and line.startswith("["):
                with contextlib.suppress(ValueError):
                    f.ready = log_time(line)
                    break


# The run -----------------------------------------------------------------------------------


async def run(
    stack: BenchStack,
    users: int,
    per_kind: int,
    messages: int,
    interval_s: float,
    gap_s: tuple[float, float],
    wait_s: float,
    seed: int,
    log,
) -> dict[str, Any]:
    assert stack.dep is not None
    rng = random.Random(seed)
    kinds = [k for k in KINDS if k != "postgres_restart" or stack.postgres is not None]
    faults = plan_faults(rng, kinds, per_kind)
    agent = SlowAgent()
    await agent.start()
    injector = Injector(stack)
    previous = (await stack.instance_config()).get("reconcile", {}).get("catch_up_minutes")
    started = time.monotonic()
    watchers: list[Watcher] = []
    try:
        await stack.configure(
            {"agents": {"registry": {AGENT: agent.config()}},
             "reconcile": {"catch_up_minutes": CATCH_UP_MINUTES}}
        )  # fmt: skip
        people = await stack.users(stack.unique("fault"), users)
        loops = [SyncLoop(u) for u in people]
        await asyncio.gather(*(loop.start() for loop in loops))
        try:
            onboarded = await asyncio.gather(
                *(onboard(stack, u, loop) for u, loop in zip(people, loops, strict=True))
            )
            rooms = [room for _, _, room in onboarded]
            await asyncio.gather(
                *(_say(loop, u, room, stack.bot_id, f"!agent {AGENT}", AGENT)
                  for u, loop, room in zip(people, loops, rooms, strict=True))
            )  # fmt: skip
        finally:
            for loop in loops:
                await loop.stop()
        log(
            f"faults: {users} users, a message every {interval_s}s each; {len(faults)} faults "
            f"({', '.join(kinds)}; {per_kind} each, seed {seed}); answers take "
            f"{agent.seconds:.1f}s"
        )
        hs_log = stack.synapse.dir / "homeserver.log"
        hs_mark = hs_log.stat().st_size if hs_log.exists() else 0
        sent: list[Sent] = []
        stop_at: list[float] = []  # monotonic: when the users stop (set once the faults end)
        mono0, wall0 = time.monotonic(), time.time()
        since_ms = int(wall0 * 1000) - 1000
        phases = [rng.uniform(0, interval_s) for _ in people]
        gaps = [rng.uniform(*gap_s) for _ in faults]

        async def user_loop(index: int, user: MatrixUser, room_id: str) -> None:
            n = 0
            while True:
                due = mono0 + phases[index] + n * interval_s
                if stop_at and due >= stop_at[0] and len(sent) >= messages:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                msg = Sent(index, n, f"f-{index}-{n}", room_id, wall0 + (due - mono0))
                sent.append(msg)
                await send_until_accepted(user, msg)
                n += 1

        def answered() -> set[str]:
            return set().union(*(w.answered for w in watchers))

        async def pause_after(fault: Fault, gap: float) -> None:
            """``gap`` past the fault's recovery, and longer (bounded) until every message it
            may have hit (meant to be sent from ``IN_FLIGHT_S`` before its start until its
            recovery) is answered."""
            assert fault.recovered is not None
            earliest, latest = fault.recovered + gap, fault.recovered + CAUGHT_UP_BOUND_S
            since, until = fault.start - IN_FLIGHT_S, fault.recovered
            while True:
                now = time.time()
                if now >= earliest:
                    done = answered()
                    hit = [m for m in sent if m.event_id and since <= m.scheduled <= until]
                    if all(m.event_id in done for m in hit):
                        return
                    if now >= latest:
                        left = sum(1 for m in hit if m.event_id not in done)
                        log(f"faults:   {left} of its messages unanswered {CAUGHT_UP_BOUND_S:.0f}s"
                            " after the recovery; going on")  # fmt: skip
                        return
                await asyncio.sleep(0.2)

        async def fault_loop() -> None:
            for i, (fault, gap) in enumerate(zip(faults, gaps, strict=True)):
                if i == 0:
                    await asyncio.sleep(gap)
                else:
                    await pause_after(faults[i - 1], gap)
                await injector.inject(fault)
                note = f" ({fault.error})" if fault.error else ""
                assert fault.recovered is not None
                log(
                    f"faults: [{fault.index + 1}/{len(faults)}] {fault.kind}, back after "
                    f"{fault.recovered - fault.start:.1f}s; {len(sent)} sent so far{note}"
                )
            stop_at.append(time.monotonic() + TAIL_S)

        watchers.extend(Watcher(u, stack.bot_id) for u in people)
        for watcher in watchers:
            watcher.start()
        senders = [
            asyncio.create_task(user_loop(i, u, room))
            for i, (u, room) in enumerate(zip(people, rooms, strict=True))
        ]
        injecting = asyncio.create_task(fault_loop())
        try:
            await injecting
            await asyncio.gather(*senders)
        finally:
            for task in [injecting, *senders]:
                task.cancel()
            await asyncio.gather(injecting, *senders, return_exceptions=True)
            restarted = await injector.ensure_up()
            if restarted:
                log(f"faults: had to start again: {', '.join(restarted)}")
        last = max([f.recovered or f.start for f in faults] + [m.accepted or 0 for m in sent])
        deadline = last + wait_s
        log(f"faults: {len(sent)} sent; waiting for the answers (at most {wait_s:.0f}s)")
        by_user = dict(zip(rooms, people, strict=True))
        wanted = {m.event_id for m in sent if m.event_id}
        try:
            while not wanted <= answered() and time.time() < deadline:
                await asyncio.sleep(1.0)
            if wanted <= answered():
                await asyncio.sleep(SETTLE_S)  # for late duplicates
            else:
                log(f"faults: {len(wanted - answered())} messages still unanswered; counting")
        finally:
            for watcher in watchers:
                await watcher.stop()
        read_at = time.time()
        read = await asyncio.gather(*(read_room(by_user[r], r, since_ms) for r in rooms))
        timelines = dict(zip(rooms, read, strict=True))
        _ready_times(stack.dep.maubot.log, faults)
        # what was read, for a look afterwards (kept with --keep)
        with contextlib.suppress(OSError):
            (stack.root / "faults-rooms.json").write_text(json.dumps(timelines))
        figures = analyze(sent, faults, timelines, stack.bot_id, agent, read_at)
        requests = homeserver_requests(hs_log, hs_mark, stack.bot_id)
    finally:
        for watcher in watchers:
            await watcher.stop()
        with contextlib.suppress(Exception):
            await injector.ensure_up()
        with contextlib.suppress(Exception):
            await stack.configure({"reconcile": {"catch_up_minutes": previous or 0.5}})
        await agent.stop()
    figures.update(
        {
            "messages_goal": messages,
            "faults_per_kind_goal": per_kind,
            "users": users,
            "interval_s": interval_s,
            "seed": seed,
            "wait_s": wait_s,
            "gap_s": list(gap_s),
            "answer_s": round(agent.seconds, 2),
            "catch_up_minutes": CATCH_UP_MINUTES,
            "seconds": round(time.monotonic() - started, 1),
            "bot_requests": {k: int(v["count"]) for k, v in sorted(requests.items())},
        }
    )
    log(
        f"faults: {figures['messages']} sent, {figures['answered']} answered, "
        f"{figures['lost']} lost, {figures['twice']} twice, {figures['out_of_order']} out of "
        f"order; recovery p95 {figures['recovery_p95_s']}s max {figures['recovery_max_s']}s"
    )
    for kind, entry in figures["by_kind"].items():
        rec = ""
        if entry.get("recovery_p95_s") is not None:
            rec = f"; recovery p95 {entry['recovery_p95_s']}s max {entry['recovery_max_s']}s"
        log(f"faults:   {kind}: {_summary(entry)}{rec}")
    return figures
