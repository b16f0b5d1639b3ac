"""The state the plugin writes into its rooms, as pure functions: names, links, power levels;
and what reconciliation reads back of a room (``parse_room`` -> ``RoomState``).

Provisioning writes it, reconciliation compares the rooms against it and repairs them; both
take it from here, so a room made today and a room repaired tomorrow look the same.
"""

from __future__ import annotations

import hashlib
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any

from .marker import MARKER_TYPE, Marker

USER_LEVEL = 50  # talk, rename, invite; below every state event the plugin relies on
BOT_LEVEL = 100
NAME_MAX = 100
# State only the bot may send: what the plugin relies on to find and route its rooms.
PROTECTED_EVENTS = (
    MARKER_TYPE, "m.space.child", "m.space.parent", "m.room.power_levels",
    "m.room.tombstone", "m.room.encryption", "m.room.server_acl", "m.room.join_rules",
    "m.room.history_visibility", "m.room.canonical_alias",
)  # fmt: skip


def matrix_to(room_id: str, server: str) -> str:
    return f"https://matrix.to/#/{room_id}?via={server}"


def new_platform_chat_id() -> str:
    return f"mx-{uuid.uuid4().hex}"


def adopted_platform_chat_id(room_id: str) -> str:
    """For a room adopted by reconciliation. Deterministic: the same room always gets the
    same id, whichever run adopts it."""
    return "mx-" + hashlib.sha256(room_id.encode()).hexdigest()[:32]


def clean_name(raw: str) -> str:
    """A room name as typed, trimmed and on one line: control and format characters
    (newlines, zero-width and direction marks) become spaces."""
    if not raw.isprintable():  # the per-character pass only for names that need it
        raw = "".join(" " if unicodedata.category(c).startswith("C") else c for c in raw)
    return " ".join(raw.split())


def chat_name(raw: object) -> str:
    """A chat room's name as the plugin stores it, whoever set it (``!rename``, a client,
    a room read at start): cleaned and cut to NAME_MAX; "" for what is not a string."""
    return clean_name(raw)[:NAME_MAX] if isinstance(raw, str) else ""


def creators_privileged(room_version: str) -> bool:
    """Room version 12 on (and its hydra pre-releases) give creators unlimited power, and
    forbid listing them in the power-level users map."""
    if room_version.startswith("org.matrix.hydra"):
        return True
    return room_version.isdigit() and int(room_version) >= 12


NO_GUESTS = {"guest_access": "forbidden"}


def no_guests() -> dict[str, Any]:
    """``initial_state`` entry: no guest access (the private_chat preset opens rooms to
    guests, and clients say so in every room)."""
    return {"type": "m.room.guest_access", "state_key": "", "content": dict(NO_GUESTS)}


def topic(text: str) -> dict[str, Any]:
    """``initial_state`` entry: the room's topic."""
    return {"type": "m.room.topic", "state_key": "", "content": {"topic": text}}


def space_child(server: str, chat_number: int) -> dict[str, Any]:
    # order keeps rooms listed in creation order (compared as strings).
    return {"via": [server], "order": f"{chat_number:08d}"}


def space_parent(server: str) -> dict[str, Any]:
    return {"via": [server], "canonical": True}


def power_levels(owner: str, bot_id: str, privileged: bool) -> dict[str, Any]:
    """The power levels of a managed room: the bot at 100 (implicitly, where creators are
    privileged), the owner enough to talk, rename and invite, never to change the plugin's
    state."""
    users = {owner: USER_LEVEL}
    if not privileged:
        users[bot_id] = BOT_LEVEL
    events = {event_type: BOT_LEVEL for event_type in PROTECTED_EVENTS}
    events.update({"m.room.name": USER_LEVEL, "m.room.topic": USER_LEVEL})
    events["m.room.avatar"] = USER_LEVEL
    return {
        "users": users,
        "users_default": 0,
        "events_default": 0,
        "state_default": BOT_LEVEL,
        "invite": USER_LEVEL,
        # Redacting a state event empties it: only the bot may (users still redact their own
        # messages, which needs no level).
        "redact": BOT_LEVEL,
        "kick": BOT_LEVEL,
        "ban": BOT_LEVEL,
        "events": events,
    }


def raised_power_levels(content: dict[str, Any]) -> dict[str, Any] | None:
    """A room's ``m.room.power_levels`` content with ``redact`` and every protected event
    raised to the bot's level, the rest (the users map too) as it is; None when nothing is
    below. A level that is no int counts as below: the repair writes an int."""
    events = content.get("events", {})
    if not isinstance(events, dict):
        return None  # unreadable: left alone rather than guessed at
    state_default = _level(content.get("state_default", USER_LEVEL))
    low = [t for t in PROTECTED_EVENTS if _level(events.get(t, state_default)) < BOT_LEVEL]
    redact_low = _level(content.get("redact", USER_LEVEL)) < BOT_LEVEL
    if not low and not redact_low:
        return None
    fixed = dict(content)
    if redact_low:
        fixed["redact"] = BOT_LEVEL
    if low:
        fixed["events"] = {**events, **dict.fromkeys(low, BOT_LEVEL)}
    return fixed


def _level(value: object) -> int:
    return value if type(value) is int else -1  # bools and strings are no levels


STATE_TYPES = [
    MARKER_TYPE,
    "m.room.create",
    "m.room.encryption",
    "m.room.guest_access",
    "m.room.name",
    "m.room.power_levels",
    "m.room.tombstone",
    "m.space.child",
    "m.space.parent",
]
_WANTED = frozenset(STATE_TYPES)


@dataclass(slots=True)
class RoomState:
    """What reconciliation reads of one room: kept small, one per joined room."""

    room_id: str
    creator: str | None = None
    created_ts: int = 0
    is_space: bool = False
    name: str | None = None
    tombstoned: bool = False
    encrypted: bool = False
    marker: Marker | None = None
    # The bot sent a marker whose content is gone (redacted) or unreadable.
    marker_emptied: bool = False
    # Corrected m.room.power_levels, where users may redact or send the plugin's state; kept
    # for rooms the bot made only (the others are never written to).
    power_levels_fix: dict[str, Any] | None = None
    # Its m.room.guest_access is there and not "forbidden" (rooms made before they were made
    # closed); kept for rooms the bot made only.
    guests_open: bool = False
    children: dict[str, bool] = field(default_factory=dict)  # child room -> listed with via
    parents: dict[str, bool] = field(default_factory=dict)  # parent Space -> with via


def parse_room(room_id: str, events: list[dict[str, Any]], bot_id: str) -> RoomState:
    """What reconciliation needs of a room's full state (a ``/state`` answer). Every field
    read is type-checked: an event with a wrong type anywhere is skipped, never fatal, and
    the rest of the room is kept."""
    room = RoomState(room_id)
    if not isinstance(events, list):
        return room
    for event in events:
        if not isinstance(event, dict):
            continue
        etype = event.get("type")
        if type(etype) is not str or etype not in _WANTED:
            continue  # most of a room's state: skipped before anything else is looked at
        key, content = event.get("state_key"), event.get("content")
        if isinstance(key, str) and isinstance(content, dict):
            _read(room, event, bot_id)
        elif etype == MARKER_TYPE and key == "" and event.get("sender") == bot_id:
            room.marker, room.marker_emptied = None, True
    if room.creator != bot_id:
        room.power_levels_fix = None
        room.guests_open = False
    return room


def _read(room: RoomState, event: dict[str, Any], bot_id: str) -> None:
    """One wanted state event (its type, key and content already type-checked)."""
    etype, key, content = event["type"], event["state_key"], event["content"]
    if etype == "m.room.create":
        _read_create(room, content, event)
    elif etype == "m.room.name":
        name = content.get("name")
        if name is None or isinstance(name, str):
            room.name = chat_name(name) or None
    elif etype == "m.room.encryption":
        room.encrypted = isinstance(content.get("algorithm"), str)
    elif etype == "m.room.tombstone":
        replacement = content.get("replacement_room")
        if replacement is None or isinstance(replacement, str):
            room.tombstoned = bool(replacement)
    elif etype == MARKER_TYPE:
        if key == "" and event.get("sender") == bot_id:
            # Only the bot's own marker counts; anyone else's is ignored.
            room.marker = Marker.from_content(content)
            room.marker_emptied = room.marker is None
    elif etype == "m.room.power_levels":
        if key == "":
            room.power_levels_fix = raised_power_levels(content)
    elif etype == "m.room.guest_access":
        if key == "":  # no value is the default, forbidden
            room.guests_open = content.get("guest_access", "forbidden") != "forbidden"
    else:  # m.space.child, m.space.parent
        via = content.get("via")
        if via is None or isinstance(via, list):
            links = room.children if etype == "m.space.child" else room.parents
            links[key] = any(isinstance(server, str) for server in via or ())


def _read_create(room: RoomState, content: dict[str, Any], event: dict[str, Any]) -> None:
    sender, ts = event.get("sender"), event.get("origin_server_ts", 0)
    kind = content.get("type")
    if not isinstance(sender, str) or type(ts) is not int:
        return  # malformed: the room counts as one the bot did not make
    if kind is not None and not isinstance(kind, str):
        return
    # The sender only: from room v11 on, content.creator is whatever the maker wrote.
    room.creator = sender
    room.created_ts = ts
    room.is_space = kind == "m.space"
