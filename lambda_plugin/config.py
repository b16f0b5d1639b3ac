"""The plugin's config: the proxy maubot edits and the checked settings derived from it
(an agent's own entry is read by ``agent_config``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mautrix.util.config import BaseProxyConfig, ConfigUpdateHelper

from .agent_config import (
    AgentSpec,
    TranscriptionSpec,
    _agent_transcription,
    _transcription,
)
from .texts import TEXTS

LANGUAGES = ("en", "ru")
BACKENDS = ("echo", "openai", "lambda")
_USER_ID = re.compile(r"^@[^:\s]+:\S+$")
_USER_PATTERN = re.compile(r"^@\*:\S+$")
_ROOM_VERSION = re.compile(r"[0-9a-z.-]{1,32}")
_MXC = re.compile(r"mxc://[A-Za-z0-9.:-]+/[A-Za-z0-9_-]+")
KB = 1024
MB = 1024 * 1024
DAY_S = 24 * 3600.0


class Config(BaseProxyConfig):
    def do_update(self, helper: ConfigUpdateHelper) -> None:
        helper.copy("language")
        helper.copy("access.allowed_users")
        helper.copy("access.admins")
        helper.copy("access.max_chats_per_user")
        helper.copy("access.shared_rooms")
        helper.copy("access.max_message_chars")
        helper.copy("access.requests_per_minute")
        helper.copy("access.max_queue_per_room")
        helper.copy("access.max_snapshots_per_user")
        helper.copy("access.daily_tokens")
        helper.copy("access.monthly_tokens")
        helper.copy("access.token_limits")
        helper.copy("access.max_kept_per_room")
        helper.copy("access.answer_estimate_tokens")
        helper.copy("access.max_joins_per_inviter")
        helper.copy("access.max_quote_chars")
        helper.copy("spaces.space_name")
        helper.copy("spaces.chat_name")
        helper.copy("spaces.encryption")
        helper.copy("spaces.room_version")
        helper.copy("spaces.avatar_url")
        helper.copy("agents.default")
        helper.copy_dict("agents.registry")
        helper.copy("files.workspace_root")
        helper.copy("files.max_size_mb")
        helper.copy("files.workspace_quota_mb")
        helper.copy("files.download_timeout_s")
        helper.copy("files.max_files_per_answer")
        helper.copy("history.max_turns")
        helper.copy("history.max_kb")
        helper.copy("history.max_snapshot_kb")
        helper.copy("replies.stream_edit_interval_s")
        helper.copy("reconcile.catch_up_minutes")
        helper.copy("reconcile.handled_kept_days")
        helper.copy("reconcile.read_batch")
        helper.copy("reconcile.catch_up_max_events")
        helper.copy("reconcile.delta_start")
        helper.copy("reconcile.delta_read_s")
        helper.copy("outages.homeserver_wait_s")
        helper.copy("outages.database_wait_s")
        helper.copy("transcription")


class UserMatcher:
    """Matches user ids against exact ids, ``@*:server`` patterns and ``*``."""

    def __init__(self, entries: list[str]) -> None:
        self.everyone = False
        self.exact: set[str] = set()
        self.servers: set[str] = set()
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"user entry {entry!r} is not a string")
            entry = entry.strip()
            if entry == "*":
                self.everyone = True
            elif _USER_PATTERN.match(entry):
                self.servers.add(entry.split(":", 1)[1])
            elif _USER_ID.match(entry):
                self.exact.add(entry)
            else:
                raise ValueError(
                    f"user entry {entry!r} is neither a user id, an @*:server pattern nor *"
                )

    def __contains__(self, user_id: str) -> bool:
        if self.everyone or user_id in self.exact:
            return True
        _, _, server = user_id.partition(":")
        return server in self.servers


def _tokens(value: Any, key: str) -> int:
    """A token limit: a whole number, 0 for no limit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a whole number of tokens, 0 (no limit) or more")
    return value


def _read_batch(value: Any) -> int:
    """reconcile.read_batch: rooms per batched read, 0 (one /state per room) to 1000."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
        raise ValueError("reconcile.read_batch must be a whole number from 0 to 1000")
    return value


def _token_limits(value: Any, daily: int, monthly: int) -> dict[str, tuple[int, int]]:
    """access.token_limits: (daily, monthly) per user id; a limit left out is the global one."""
    key = "access.token_limits"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must map user ids to {{daily: .., monthly: ..}}")
    limits = {}
    for user_id, entry in value.items():
        # Exact ids only: "@*:server" would read as a pattern, and it is none here.
        if not isinstance(user_id, str) or not _USER_ID.match(user_id) or "*" in user_id:
            raise ValueError(f"{key}: {user_id!r} is not a user id")
        where = f"{key}.{user_id}"
        if not isinstance(entry, dict) or not set(entry) <= {"daily", "monthly"}:
            raise ValueError(f"{where} must be a map of daily and monthly")
        day, month = (
            _tokens(default if entry.get(name) is None else entry[name], f"{where}.{name}")
            for name, default in (("daily", daily), ("monthly", monthly))
        )
        limits[user_id] = (day, month)
    return limits


def users_of(value: Any, key: str) -> UserMatcher:
    if value is None:
        value = []
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list of user ids or patterns")
    try:
        return UserMatcher(value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _positive_number(value: Any, key: str, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f"{key} must be a positive {'whole ' if integer else ''}number")
    return value


def _template(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty text")
    try:
        value.format(**{name: "x" for name in allowed})
    except (LookupError, AttributeError, ValueError) as e:
        raise ValueError(f"{key} may only use the placeholders {allowed}: {e}") from None
    return value


def _chat_name(value: Any, language: str) -> str:
    """The configured template; the shipped default follows the language (Chat N / Чат N)."""
    template = _template(value, "spaces.chat_name", ("n",))
    if template == TEXTS["en"]["default_chat_name"]:
        return TEXTS[language]["default_chat_name"]
    return template

ENCRYPTION_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Settings:
    """Checked, typed values derived from the config; rebuilt on every config save."""

    language: str
    allowed_users: UserMatcher
    admins: UserMatcher
    max_chats_per_user: int
    shared_rooms: bool
    max_message_chars: int
    requests_per_minute: int
    space_name: str
    chat_name: str
    default_agent: str
    agents: dict[str, AgentSpec]
    workspace_root: str | None
    max_file_bytes: int
    stream_edit_interval_s: float
    catch_up_s: float
    max_queue_per_room: int
    max_snapshots_per_user: int
    workspace_quota_bytes: int
    download_timeout_s: float
    handled_kept_s: float
    read_batch: int  # rooms per sliding-sync read at start; 0: one /state per room
    encryption: str  # auto | always | never
    transcription: TranscriptionSpec | None  # None: voice messages are not transcribed
    # Agents whose own transcription option overrides the one above (None: off for them).
    agent_transcription: dict[str, TranscriptionSpec | None]
    daily_tokens: int  # 0: no limit
    monthly_tokens: int  # 0: no limit
    token_limits: dict[str, tuple[int, int]]  # user id -> (daily, monthly), 0: no limit
    max_kept_per_room: int  # messages held for !retry in one room
    answer_estimate_tokens: int  # what a running answer reserves against a quota
    homeserver_wait_s: float  # how long a send is retried while the homeserver is unreachable
    database_wait_s: float  # how long a database call is retried while the database is down
    max_joins_per_inviter: int  # rooms joined for one user beyond their DM and managed rooms
    max_quote_chars: int  # of the event a message replies to, handed to the agent with it
    max_files_per_answer: int  # files of one answer sent; the rest are named in one notice
    history_max_turns: int  # turns kept per conversation; older ones are pruned
    history_max_bytes: int  # text kept per conversation (UTF-8); older turns are pruned
    max_snapshot_bytes: int  # largest snapshot !save writes (and !load restores)
    room_version: str | None  # of new Spaces and chats; None: the homeserver's default
    space_avatar_url: str | None  # an mxc:// avatar for new Spaces
    catch_up_max_events: int  # events of one room a start reads back, a cut timeline paged
    delta_start: bool  # a restart reads the rooms changed since the stored position only
    delta_read_s: float  # a restart's wait for one changed room; then it is verified later

    def token_limits_of(self, user_id: str) -> tuple[int, int]:
        """The user's (daily, monthly) token limits; 0 is no limit."""
        return self.token_limits.get(user_id, (self.daily_tokens, self.monthly_tokens))

    def transcription_for(self, agent_id: str) -> TranscriptionSpec | None:
        """How voice messages to this agent are transcribed (None: they are not)."""
        if agent_id in self.agent_transcription:
            return self.agent_transcription[agent_id]
        return self.transcription

    @classmethod
    def from_config(cls, config: BaseProxyConfig) -> Settings:
        """Builds settings, or raises ValueError naming the first bad key."""
        language = _language(config["language"])
        agents = _registry(config["agents.registry"])
        return cls(
            language=language,
            space_name=_template(
                config["spaces.space_name"], "spaces.space_name", ("displayname", "user_id")
            ),
            chat_name=_chat_name(config["spaces.chat_name"], language),
            encryption=_choice(config, "spaces.encryption", ENCRYPTION_MODES),
            room_version=_optional(config, "spaces.room_version", _ROOM_VERSION),
            space_avatar_url=_optional(config, "spaces.avatar_url", _MXC),
            default_agent=_default_agent(config["agents.default"], agents),
            agents=agents,
            transcription=_transcription(config["transcription"], "transcription"),
            agent_transcription=_agent_transcription(agents),
            **_access(config),
            **_files_and_history(config),
            **_timing(config),
        )


def _access(config: BaseProxyConfig) -> dict[str, Any]:
    """The access.* keys: who may use the bot and how much."""
    daily = _tokens(config["access.daily_tokens"], "access.daily_tokens")
    monthly = _tokens(config["access.monthly_tokens"], "access.monthly_tokens")
    return {
        "allowed_users": users_of(config["access.allowed_users"], "access.allowed_users"),
        "admins": users_of(config["access.admins"], "access.admins"),
        "max_chats_per_user": _whole(config, "access.max_chats_per_user"),
        "shared_rooms": _flag(config, "access.shared_rooms"),
        "max_message_chars": _whole(config, "access.max_message_chars"),
        "requests_per_minute": _whole(config, "access.requests_per_minute"),
        "max_queue_per_room": _whole(config, "access.max_queue_per_room"),
        "max_snapshots_per_user": _whole(config, "access.max_snapshots_per_user"),
        "daily_tokens": daily,
        "monthly_tokens": monthly,
        "token_limits": _token_limits(config["access.token_limits"], daily, monthly),
        "max_kept_per_room": _whole(config, "access.max_kept_per_room"),
        "answer_estimate_tokens": _tokens(
            config["access.answer_estimate_tokens"], "access.answer_estimate_tokens"
        ),
        "max_joins_per_inviter": _whole(config, "access.max_joins_per_inviter"),
        "max_quote_chars": _whole(config, "access.max_quote_chars"),
    }


def _files_and_history(config: BaseProxyConfig) -> dict[str, Any]:
    """The files.* and history.* keys: sizes and counts of what is stored and sent."""
    return {
        "workspace_root": _workspace_root(config["files.workspace_root"]),
        "max_file_bytes": int(_number(config, "files.max_size_mb") * MB),
        "workspace_quota_bytes": int(_number(config, "files.workspace_quota_mb") * MB),
        "download_timeout_s": _number(config, "files.download_timeout_s"),
        "max_files_per_answer": _whole(config, "files.max_files_per_answer"),
        "history_max_turns": _whole(config, "history.max_turns"),
        "history_max_bytes": int(_number(config, "history.max_kb") * KB),
        "max_snapshot_bytes": int(_number(config, "history.max_snapshot_kb") * KB),
    }


def _timing(config: BaseProxyConfig) -> dict[str, Any]:
    """Intervals, windows and waits."""
    return {
        "stream_edit_interval_s": _number(config, "replies.stream_edit_interval_s"),
        "catch_up_s": 60.0 * _number(config, "reconcile.catch_up_minutes"),
        "handled_kept_s": _number(config, "reconcile.handled_kept_days") * DAY_S,
        "read_batch": _read_batch(config["reconcile.read_batch"]),
        "catch_up_max_events": _whole(config, "reconcile.catch_up_max_events"),
        "delta_start": _flag(config, "reconcile.delta_start"),
        "delta_read_s": _number(config, "reconcile.delta_read_s"),
        "homeserver_wait_s": _number(config, "outages.homeserver_wait_s"),
        "database_wait_s": _number(config, "outages.database_wait_s"),
    }


def _optional(config: BaseProxyConfig, key: str, form: re.Pattern[str]) -> str | None:
    """An optional text of the given form; null or empty is none (a whole number, as YAML
    reads ``room_version: 10``, is its text)."""
    value = config[key]
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not form.fullmatch(value):
        raise ValueError(f"{key} must be null or {form.pattern!r}, not {value!r}")
    return value


def _choice(config: BaseProxyConfig, key: str, choices: tuple[str, ...]) -> str:
    value = config[key]
    if value not in choices:
        raise ValueError(f"{key} must be one of {choices}, not {value!r}")
    return str(value)


def _language(value: Any) -> str:
    if value not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, not {value!r}")
    return str(value)


def _registry(registry: Any) -> dict[str, AgentSpec]:
    """agents.registry: each agent id with its backend and the rest of its options."""
    if not isinstance(registry, dict) or not registry:
        raise ValueError("agents.registry must map at least one agent id to its settings")
    agents: dict[str, AgentSpec] = {}
    for agent_id, options in registry.items():
        if not isinstance(options, dict) or options.get("backend") not in BACKENDS:
            raise ValueError(f"agents.registry.{agent_id}.backend must be one of {BACKENDS}")
        opts = {k: v for k, v in options.items() if k != "backend"}
        agents[str(agent_id)] = AgentSpec(str(agent_id), options["backend"], opts)
    return agents


def _default_agent(value: Any, agents: dict[str, AgentSpec]) -> str:
    if not isinstance(value, str) or value not in agents:
        raise ValueError(f"agents.default {value!r} is not in agents.registry")
    return value


def _workspace_root(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError("files.workspace_root must be a path or null")
    return value or None


def _flag(config: BaseProxyConfig, key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _whole(config: BaseProxyConfig, key: str) -> int:
    """A positive whole number."""
    return int(_positive_number(config[key], key, integer=True))


def _number(config: BaseProxyConfig, key: str) -> float:
    """A positive number, as a float (an int in the YAML is as good)."""
    return float(_positive_number(config[key], key))
