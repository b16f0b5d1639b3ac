"""The plugin config: defaults of base-config.yaml, do_update, validation and user matching."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from mautrix.util.config import RecursiveDict
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from yarl import URL

from lambda_plugin.agent_config import AgentSpec, TranscriptionSpec
from lambda_plugin.config import Config, Settings, UserMatcher

BASE_CONFIG = Path(__file__).resolve().parents[2] / "base-config.yaml"
yaml = YAML()


def load_base() -> RecursiveDict[CommentedMap]:
    return RecursiveDict(yaml.load(BASE_CONFIG.read_text(encoding="utf-8")), CommentedMap)


def as_yaml_map(data: dict[str, Any]) -> CommentedMap:
    """``data`` as maubot hands it over: a CommentedMap parsed from the instance's YAML."""
    buf = io.StringIO()
    yaml.dump(data, buf)
    return yaml.load(buf.getvalue())


def make_config(user: dict[str, Any] | None = None) -> Config:
    """A Config wired as maubot wires it: the user's YAML, base-config cloned on every load."""
    base = load_base()
    user_map = as_yaml_map(user) if user else CommentedMap()
    saved: list[Any] = []
    config = Config(load=lambda: user_map, load_base=base.clone, save=saved.append)
    config.load_and_update()
    return config


def settings(**overrides: Any) -> Settings:
    """Settings from base-config with dotted keys overridden (``access__admins=...``)."""
    config = make_config()
    for key, value in overrides.items():
        config[key.replace("__", ".")] = value
    return Settings.from_config(config)


# Keys whose value is a map of entries named by the operator: each counts as one key.
MAP_KEYS = ("agents.registry", "access.token_limits", "transcription")


def leaf_keys(data: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a config; the MAP_KEYS count as one key each."""
    keys = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in MAP_KEYS:
            keys |= leaf_keys(value, f"{path}.")
        else:
            keys.add(path)
    return keys


# A custom value, different from the default, for every key of base-config.yaml.
CUSTOM: dict[str, Any] = {
    "language": "ru",
    "access.allowed_users": ["@alice:example.org", "@*:corp.example"],
    "access.admins": ["@root:example.org"],
    "access.max_chats_per_user": 7,
    "access.shared_rooms": True,
    "access.max_message_chars": 500,
    "access.requests_per_minute": 5,
    "access.max_queue_per_room": 4,
    "access.max_snapshots_per_user": 9,
    "access.daily_tokens": 1000,
    "access.monthly_tokens": 20000,
    "access.token_limits": {
        "@alice:example.org": {"daily": 5, "monthly": 50},
        "@boss:example.org": {"daily": 0},
    },
    "access.max_kept_per_room": 3,
    "access.answer_estimate_tokens": 0,
    "spaces.space_name": "Space of {user_id}",
    "spaces.chat_name": "Talk #{n}",
    "spaces.encryption": "never",
    "agents.default": "gpt",
    "agents.registry": {
        "echo": {"backend": "echo", "note": "kept"},
        "gpt": {
            "backend": "openai",
            "base_url": "http://127.0.0.1:11434/v1",
            "model": "llama3",
            "max_history": 12,
        },
    },
    "files.workspace_root": "/srv/workspace",
    "files.max_size_mb": 3,
    "files.workspace_quota_mb": 10,
    "files.download_timeout_s": 60,
    "files.max_files_per_answer": 3,
    "history.max_turns": 30,
    "history.max_kb": 64,
    "history.max_snapshot_kb": 128,
    "replies.stream_edit_interval_s": 0.25,
    "reconcile.catch_up_minutes": 3,
    "reconcile.handled_kept_days": 2,
    "reconcile.read_batch": 50,
    "reconcile.catch_up_max_events": 300,
    "reconcile.delta_start": False,
    "reconcile.delta_read_s": 4,
    "spaces.room_version": "10",
    "spaces.avatar_url": "mxc://example.org/abcDEF123",
    "outages.homeserver_wait_s": 30,
    "outages.database_wait_s": 2.5,
    "access.max_joins_per_inviter": 4,
    "access.max_quote_chars": 300,
    "transcription": {
        "base_url": "http://127.0.0.1:8000/v1",
        "model": "whisper-1",
        "api_key": "sk-transcribe-secret",
        "max_mb": 10,
        "timeout_s": 30,
    },
}


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# defaults


def test_base_config_defaults() -> None:
    s = Settings.from_config(load_base())
    assert s.language == "en"
    assert "@anyone:anywhere.org" in s.allowed_users
    assert "@root:example.org" not in s.admins
    assert s.max_chats_per_user == 50
    assert s.shared_rooms is False
    assert s.space_name == "Lambda — {displayname}"
    assert s.chat_name == "Chat {n}"
    assert s.encryption == "auto"
    assert s.default_agent == "echo"
    assert s.agents == {"echo": AgentSpec("echo", "echo", {})}
    assert s.workspace_root is None
    assert s.max_file_bytes == 50 * 1024 * 1024
    assert s.stream_edit_interval_s == 1.0
    assert type(s.stream_edit_interval_s) is float
    assert s.transcription is None and s.agent_transcription == {}
    assert s.transcription_for("echo") is None
    assert (s.daily_tokens, s.monthly_tokens, s.token_limits) == (0, 0, {})
    assert s.token_limits_of("@alice:example.org") == (0, 0)
    assert (s.max_joins_per_inviter, s.max_files_per_answer) == (20, 10)
    assert (s.history_max_turns, s.history_max_bytes) == (200, 1024 * 1024)
    assert s.max_snapshot_bytes == 1024 * 1024


def test_empty_user_config_gets_the_defaults() -> None:
    config = make_config()
    for key in leaf_keys(load_base()._data):
        assert plain(config[key]) == plain(load_base()[key]), key
    s = Settings.from_config(config)
    assert (s.language, s.default_agent, s.max_chats_per_user) == ("en", "echo", 50)


# do_update


def test_custom_values_cover_every_key_of_base_config() -> None:
    assert set(CUSTOM) == leaf_keys(load_base()._data)
    base = load_base()
    for key, value in CUSTOM.items():
        assert plain(base[key]) != value, f"{key}: the custom value must differ from the default"


def test_do_update_copies_every_key() -> None:
    config = make_config(nested(CUSTOM))
    for key, value in CUSTOM.items():
        assert plain(config[key]) == value, key


def test_do_update_replaces_the_registry() -> None:
    user = nested({"agents.default": "only", "agents.registry": {"only": {"backend": "echo"}}})
    config = make_config(user)
    assert plain(config["agents.registry"]) == {"only": {"backend": "echo"}}


def test_do_update_drops_unknown_keys() -> None:
    config = make_config({"language": "ru", "obsolete": {"key": 1}})
    assert config["obsolete"] is None
    assert config["language"] == "ru"
    assert config["access.max_chats_per_user"] == 50


def test_do_update_keeps_false_and_empty_values() -> None:
    # helper.copy skips None only: false, 0 and [] are real user choices.
    config = make_config(
        nested({"access.shared_rooms": False, "access.allowed_users": [], "access.admins": []})
    )
    assert config["access.shared_rooms"] is False
    assert plain(config["access.allowed_users"]) == []


def test_custom_config_gives_custom_settings() -> None:
    s = Settings.from_config(make_config(nested(CUSTOM)))
    assert s.language == "ru"
    assert "@alice:example.org" in s.allowed_users
    assert "@bob:corp.example" in s.allowed_users
    assert "@bob:example.org" not in s.allowed_users
    assert "@root:example.org" in s.admins
    assert "@alice:example.org" not in s.admins
    assert s.max_chats_per_user == 7
    assert s.shared_rooms is True
    assert s.delta_start is False
    assert s.delta_read_s == 4.0
    assert s.space_name == "Space of {user_id}"
    assert s.chat_name == "Talk #{n}"
    assert s.encryption == "never"
    assert s.default_agent == "gpt"
    assert s.agents["gpt"] == AgentSpec(
        "gpt",
        "openai",
        {"base_url": "http://127.0.0.1:11434/v1", "model": "llama3", "max_history": 12},
    )
    assert s.agents["echo"] == AgentSpec("echo", "echo", {"note": "kept"})
    assert s.workspace_root == "/srv/workspace"
    assert s.max_file_bytes == 3 * 1024 * 1024
    assert s.stream_edit_interval_s == 0.25
    assert s.catch_up_s == 180
    assert (s.max_message_chars, s.requests_per_minute) == (500, 5)
    assert s.transcription == TranscriptionSpec(
        URL("http://127.0.0.1:8000/v1"), "whisper-1", "sk-transcribe-secret", 10.0, 30.0
    )
    assert (s.daily_tokens, s.monthly_tokens) == (1000, 20000)
    assert s.token_limits == {"@alice:example.org": (5, 50), "@boss:example.org": (0, 20000)}
    assert (s.max_kept_per_room, s.answer_estimate_tokens) == (3, 0)
    assert (s.homeserver_wait_s, s.database_wait_s) == (30.0, 2.5)


def test_limits_default_to_base_config() -> None:
    s = Settings.from_config(load_base())
    assert s.max_queue_per_room == 20
    assert s.max_snapshots_per_user == 50
    assert s.workspace_quota_bytes == 1024 * 1024 * 1024
    assert s.download_timeout_s == 300.0 and type(s.download_timeout_s) is float
    assert s.handled_kept_s == 7 * 24 * 3600.0 and type(s.handled_kept_s) is float
    assert s.read_batch == 200
    assert (s.max_kept_per_room, s.answer_estimate_tokens) == (20, 500)
    assert s.homeserver_wait_s == 600.0 and type(s.homeserver_wait_s) is float
    assert s.database_wait_s == 600.0 and type(s.database_wait_s) is float


def test_custom_limits() -> None:
    s = Settings.from_config(make_config(nested(CUSTOM)))
    assert (s.max_queue_per_room, s.max_snapshots_per_user) == (4, 9)
    assert s.workspace_quota_bytes == 10 * 1024 * 1024
    assert s.download_timeout_s == 60.0
    assert s.handled_kept_s == 2 * 24 * 3600.0
    assert s.read_batch == 50 and settings(reconcile__read_batch=0).read_batch == 0
    fractions = settings(files__workspace_quota_mb=0.5, reconcile__handled_kept_days=0.5)
    assert fractions.workspace_quota_bytes == 512 * 1024
    assert fractions.handled_kept_s == 12 * 3600.0


def test_russian_default_chat_name() -> None:
    s = Settings.from_config(make_config({"language": "ru"}))
    assert s.chat_name == "Чат {n}"


def test_valid_edge_values() -> None:
    s = settings(
        files__max_size_mb=0.5,
        replies__stream_edit_interval_s=2,
        files__workspace_root="",
        spaces__space_name="{displayname} ({user_id}) {{literal}}",
        access__allowed_users=None,
    )
    assert s.max_file_bytes == 512 * 1024
    assert s.stream_edit_interval_s == 2.0
    assert s.workspace_root is None
    assert "@alice:example.org" not in s.allowed_users


# validation: each bad value is refused with a message naming its key


INVALID: list[tuple[str, Any]] = [
    ("spaces.encryption", "sometimes"),
    ("spaces.encryption", True),
    ("spaces.encryption", None),
    ("language", "de"),
    ("language", "EN"),
    ("language", None),
    ("agents.registry", {"echo": {"backend": "telepathy"}}),
    ("agents.registry", {"echo": {}}),
    ("agents.registry", {"echo": "echo"}),
    ("agents.registry", {}),
    ("agents.default", "gpt"),
    ("access.max_chats_per_user", -1),
    ("access.max_chats_per_user", 0),
    ("access.max_chats_per_user", True),
    ("access.max_chats_per_user", 2.5),
    ("access.max_chats_per_user", "10"),
    ("access.allowed_users", ["alice"]),
    ("access.allowed_users", ["@*"]),
    ("access.allowed_users", ["@alice:example.org", "@*:"]),
    ("access.allowed_users", [42]),
    ("access.admins", ["alice"]),
    ("spaces.space_name", "Lambda {name}"),
    ("spaces.space_name", "Lambda {n}"),
    ("spaces.space_name", "Lambda {0}"),
    ("spaces.space_name", "Lambda {displayname"),
    ("spaces.space_name", "Lambda {displayname.nope}"),
    ("spaces.space_name", ""),
    ("spaces.chat_name", "Chat {displayname}"),
    ("access.shared_rooms", "yes"),
    ("access.shared_rooms", 1),
    ("reconcile.delta_start", "no"),
    ("reconcile.delta_read_s", 0),
    ("reconcile.delta_read_s", "10"),
    ("replies.stream_edit_interval_s", -0.5),
    ("replies.stream_edit_interval_s", 0),
    ("files.max_size_mb", 0),
    ("files.workspace_root", 5),
    ("access.max_queue_per_room", 0),
    ("access.max_queue_per_room", 2.5),
    ("access.max_queue_per_room", None),
    ("access.max_snapshots_per_user", -1),
    ("access.max_snapshots_per_user", True),
    ("files.workspace_quota_mb", 0),
    ("files.workspace_quota_mb", "1G"),
    ("files.download_timeout_s", 0),
    ("files.download_timeout_s", -300),
    ("reconcile.handled_kept_days", 0),
    ("reconcile.handled_kept_days", False),
    ("reconcile.read_batch", -1),
    ("reconcile.read_batch", 1001),
    ("reconcile.read_batch", 2.5),
    ("reconcile.read_batch", True),
    ("reconcile.read_batch", None),
    ("access.daily_tokens", -1),
    ("access.daily_tokens", 1.5),
    ("access.daily_tokens", True),
    ("access.daily_tokens", "1000"),
    ("access.daily_tokens", None),
    ("access.monthly_tokens", -20000),
    ("access.monthly_tokens", "lots"),
    ("access.max_kept_per_room", 0),
    ("access.max_kept_per_room", 2.5),
    ("access.max_kept_per_room", True),
    ("access.max_kept_per_room", None),
    ("access.answer_estimate_tokens", -1),
    ("access.answer_estimate_tokens", 1.5),
    ("access.answer_estimate_tokens", True),
    ("access.answer_estimate_tokens", None),
    ("outages.homeserver_wait_s", 0),
    ("outages.homeserver_wait_s", -1),
    ("outages.homeserver_wait_s", "10m"),
    ("outages.database_wait_s", 0),
    ("outages.database_wait_s", False),
    ("outages.database_wait_s", None),
    ("access.token_limits", ["@alice:example.org"]),
    ("access.token_limits", {"alice": {"daily": 1}}),
    ("access.token_limits", {"@*:example.org": {"daily": 1}}),
    ("access.token_limits", {"@alice:example.org": 1000}),
    ("access.token_limits", {"@alice:example.org": {"weekly": 1}}),
    ("access.token_limits", {"@alice:example.org": {"daily": -1}}),
    ("access.token_limits", {"@alice:example.org": {"monthly": 2.5}}),
    ("transcription", "on"),
    ("transcription", True),
    ("transcription", {"model": "whisper-1"}),
    ("transcription", {"base_url": "http://h/v1"}),
    ("transcription", {"base_url": "ftp://h", "model": "m"}),
    ("transcription", {"base_url": "http://h", "model": 7}),
    ("transcription", {"base_url": "http://h", "model": "m", "api_key": 12345}),
    ("transcription", {"base_url": "http://h", "model": "m", "max_mb": 0}),
    ("transcription", {"base_url": "http://h", "model": "m", "timeout_s": -1}),
    ("transcription", {"base_url": "http://h", "model": "m", "apikey": "x"}),
    ("agents.registry", {"echo": {"backend": "echo", "transcription": "on"}}),
    ("agents.registry", {"echo": {"backend": "echo", "transcription": {"model": "m"}}}),
]


@pytest.mark.parametrize(("key", "value"), INVALID, ids=[f"{k}={v!r}" for k, v in INVALID])
def test_invalid_value_is_refused_naming_its_key(key: str, value: Any) -> None:
    config = make_config()
    config[key] = value
    with pytest.raises(ValueError) as info:
        Settings.from_config(config)
    assert key in str(info.value)


SECRET = "sk-never-shown-123"
LEAKY_TRANSCRIPTION = [
    {"base_url": f"http://user:{SECRET}@h/v1", "model": "m"},
    {"base_url": f"http://h/v1?key={SECRET}x", "model": "m", "api_key": [SECRET]},
    {"base_url": "http://h/v1", "model": "m", "api_key": {"key": SECRET}},
    {"base_url": "http://h/v1", "model": "m", "api_key": SECRET, "max_mb": "big"},
    {"base_url": SECRET, "model": "m", "api_key": SECRET},
]


@pytest.mark.parametrize("value", LEAKY_TRANSCRIPTION)
@pytest.mark.parametrize("where", ["transcription", "agents.registry.echo.transcription"])
def test_transcription_errors_never_show_a_secret(value: dict[str, Any], where: str) -> None:
    config = make_config()
    config[where] = value
    with pytest.raises(ValueError) as info:
        Settings.from_config(config)
    assert where in str(info.value)
    assert SECRET not in str(info.value)


def test_the_api_key_stays_out_of_repr() -> None:
    s = Settings.from_config(make_config(nested(CUSTOM)))
    assert s.transcription is not None and s.transcription.api_key == "sk-transcribe-secret"
    assert "sk-transcribe-secret" not in repr(s.transcription)
    assert "sk-transcribe-secret" not in repr(s)


def test_transcription_defaults_and_bounds() -> None:
    s = settings(transcription={"base_url": "https://api.example.org/v1", "model": "whisper-1"})
    assert s.transcription == TranscriptionSpec(URL("https://api.example.org/v1"), "whisper-1")
    assert (s.transcription.api_key, s.transcription.max_mb) == (None, 25.0)
    assert s.transcription.timeout_s == 120.0 and type(s.transcription.timeout_s) is float
    assert s.transcription.max_bytes == 25 * 1024 * 1024
    small = settings(transcription={"base_url": "http://h", "model": "m", "max_mb": 0.5})
    assert small.transcription is not None and small.transcription.max_bytes == 512 * 1024
    keyless = settings(transcription={"base_url": "http://h", "model": "m", "api_key": ""})
    assert keyless.transcription is not None and keyless.transcription.api_key is None
    assert settings(transcription=False).transcription is None


def test_an_agent_may_have_its_own_transcription_or_none() -> None:
    own = {"base_url": "http://local:9000/v1", "model": "small"}
    registry = {
        "echo": {"backend": "echo"},
        "deaf": {"backend": "echo", "transcription": False},
        "local": {"backend": "echo", "transcription": own},
        "inherits": {"backend": "echo", "transcription": None},
    }
    user = {**CUSTOM, "agents.registry": registry, "agents.default": "echo"}
    s = Settings.from_config(make_config(nested(user)))
    assert s.transcription is not None
    assert s.transcription_for("echo") == s.transcription
    assert s.transcription_for("inherits") == s.transcription
    assert s.transcription_for("unknown-agent") == s.transcription
    assert s.transcription_for("deaf") is None
    assert s.transcription_for("local") == TranscriptionSpec(URL("http://local:9000/v1"), "small")
    # Without a top-level one, only the agent with its own transcribes.
    s = settings(agents__registry=registry)
    assert [a for a in registry if s.transcription_for(a)] == ["local"]


def test_token_limits_of_a_user() -> None:
    s = Settings.from_config(make_config(nested(CUSTOM)))
    assert s.token_limits_of("@alice:example.org") == (5, 50)
    assert s.token_limits_of("@boss:example.org") == (0, 20000)  # no daily limit for the boss
    assert s.token_limits_of("@carol:example.org") == (1000, 20000)
    assert s.token_limits_of("@Alice:example.org") == (1000, 20000)  # exact ids only
    s = settings(access__token_limits={"@a:x.org": {}, "@b:x.org": {"daily": None}})
    assert s.token_limits == {"@a:x.org": (0, 0), "@b:x.org": (0, 0)}
    assert settings(access__token_limits=None).token_limits == {}


def test_token_limits_map_is_replaced_whole() -> None:
    # The user's map replaces the (empty) default; user ids with dots are kept as one key.
    config = make_config(nested({"access.token_limits": {"@a.b:c.d.org": {"daily": 3}}}))
    assert plain(config["access.token_limits"]) == {"@a.b:c.d.org": {"daily": 3}}
    assert Settings.from_config(config).token_limits_of("@a.b:c.d.org") == (3, 0)


def test_unknown_backend_names_the_agent() -> None:
    config = make_config(nested(CUSTOM))
    config["agents.registry.gpt.backend"] = "gpt4"
    with pytest.raises(ValueError, match=r"agents\.registry\.gpt\.backend"):
        Settings.from_config(config)


def test_bad_default_agent_is_named() -> None:
    with pytest.raises(ValueError, match=r"agents\.default 'missing'"):
        settings(agents__default="missing")


# UserMatcher


def test_matcher_exact() -> None:
    m = UserMatcher(["@alice:example.org", " @bob:example.org "])
    assert "@alice:example.org" in m
    assert "@bob:example.org" in m
    assert "@carol:example.org" not in m
    assert "@alice:example.org.evil" not in m
    assert "@alice:example.orgx" not in m
    assert "@alice2:example.org" not in m
    assert "@alic:example.org" not in m
    assert "@alice:other.org" not in m


def test_matcher_server_pattern() -> None:
    m = UserMatcher(["@*:example.org"])
    assert "@alice:example.org" in m
    assert "@bob:example.org" in m
    assert "@alice:other.org" not in m
    assert "@alice:example.org.evil" not in m
    assert "@alice:evil.example.org" not in m
    assert "@alice:notexample.org" not in m
    assert "@alice:example.org:8448" not in m
    assert "@example.org:evil.org" not in m
    assert "example.org" not in m
    assert "" not in m


def test_matcher_everyone() -> None:
    m = UserMatcher(["*"])
    assert "@alice:example.org" in m
    assert "@anyone:anywhere.net" in m


def test_matcher_mixed() -> None:
    m = UserMatcher(["@root:admin.org", "@*:example.org"])
    assert "@root:admin.org" in m
    assert "@someone:example.org" in m
    assert "@other:admin.org" not in m


def test_matcher_empty_matches_nobody() -> None:
    m = UserMatcher([])
    assert "@alice:example.org" not in m
    assert "*" not in m


@pytest.mark.parametrize(
    "entry", ["alice", "@*", "@alice", "*:example.org", "@*:", "", "@alice :x", "@:x", 7, None]
)
def test_matcher_refuses_bad_entries(entry: Any) -> None:
    with pytest.raises(ValueError):
        UserMatcher([entry])


@pytest.mark.parametrize(("value", "expected"), [(10, "10"), ("11", "11"), (None, None), ("", None)])
def test_a_room_version_may_be_written_as_a_number(value: Any, expected: str | None) -> None:
    assert settings(spaces__room_version=value).room_version == expected


@pytest.mark.parametrize("value", [True, 1.5, "ten!", ["10"]])
def test_a_room_version_of_another_form_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"spaces\.room_version"):
        settings(spaces__room_version=value)
