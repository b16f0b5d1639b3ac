"""Policy: admit() and refusal() decide who gets an answer where; RateLimiter how often."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from lambda_plugin.config import Settings, UserMatcher
from lambda_plugin.db import ChatRoomRow
from lambda_plugin.policy import Admission, RateLimiter, admit, refusal
from lambda_plugin.texts import TEXTS, text
from tests.unit.test_config import settings

OWNER = "@alice:example.org"
OTHER = "@bob:example.org"
STRANGER = "@eve:elsewhere.net"


def room(**overrides: Any) -> ChatRoomRow:
    fields: dict[str, Any] = {
        "room_id": "!chat:example.org",
        "user_id": OWNER,
        "chat_id": "chat-1",
        "name": "Chat 1",
        "agent_id": "echo",
        "platform_chat_id": "pc-1",
        "archived": False,
        "gone": False,
        "created_at": 0,
    }
    fields.update(overrides)
    return ChatRoomRow(**fields)


def with_users(s: Settings, *users: str) -> Settings:
    return replace(s, allowed_users=UserMatcher(list(users)))


@pytest.fixture(scope="module")
def base() -> Settings:
    """base-config.yaml's defaults: everyone allowed, no shared rooms."""
    return settings()


# --- admit ----------------------------------------------------------------------------------


def test_defaults_are_what_the_tests_assume(base: Settings) -> None:
    assert not base.shared_rooms
    assert OWNER in base.allowed_users
    assert base.max_message_chars > 0


def test_owner_in_active_room_is_taken(base: Settings) -> None:
    assert admit(room(), OWNER, base) is Admission.TAKE


def test_no_room_points(base: Settings) -> None:
    assert admit(None, OWNER, base) is Admission.POINT
    assert admit(None, STRANGER, base) is Admission.POINT


def test_gone_room_points(base: Settings) -> None:
    assert admit(room(gone=True), OWNER, base) is Admission.POINT
    # even for another member, and even when archived too
    assert admit(room(gone=True, archived=True), OTHER, base) is Admission.POINT


def test_archived_room_is_still_taken(base: Settings) -> None:
    # taken so the owner is told why there is no answer (refusal does that)
    assert admit(room(archived=True), OWNER, base) is Admission.TAKE


def test_other_member_without_shared_rooms_is_ignored(base: Settings) -> None:
    assert admit(room(), OTHER, base) is Admission.IGNORE


def test_other_member_with_shared_rooms_is_taken(base: Settings) -> None:
    shared = replace(base, shared_rooms=True)
    assert admit(room(), OTHER, shared) is Admission.TAKE
    assert admit(room(), OWNER, shared) is Admission.TAKE


def test_shared_rooms_from_the_config() -> None:
    s = settings(access__shared_rooms=True)
    assert s.shared_rooms
    assert admit(room(), OTHER, s) is Admission.TAKE


def test_user_not_allowed_is_ignored(base: Settings) -> None:
    only_other = with_users(base, OTHER)
    assert admit(room(), OWNER, only_other) is Admission.IGNORE


def test_other_member_allowed_but_not_shared_is_ignored(base: Settings) -> None:
    s = with_users(base, OWNER, OTHER)
    assert admit(room(), OTHER, s) is Admission.IGNORE


def test_shared_but_not_allowed_is_ignored(base: Settings) -> None:
    s = replace(with_users(base, OWNER), shared_rooms=True)
    assert admit(room(), OWNER, s) is Admission.TAKE
    assert admit(room(), OTHER, s) is Admission.IGNORE


def test_server_pattern_from_the_config() -> None:
    s = settings(access__allowed_users=["@*:example.org"], access__shared_rooms=True)
    assert admit(room(), OWNER, s) is Admission.TAKE
    assert admit(room(), OTHER, s) is Admission.TAKE
    assert admit(room(), STRANGER, s) is Admission.IGNORE


def test_nobody_allowed_ignores_even_the_owner(base: Settings) -> None:
    assert admit(room(), OWNER, with_users(base)) is Admission.IGNORE


# --- refusal --------------------------------------------------------------------------------


def test_no_refusal_for_a_normal_message(base: Settings) -> None:
    assert refusal(room(), 5, base) is None
    assert refusal(room(), 0, base) is None


def test_archived_room_refuses(base: Settings) -> None:
    assert refusal(room(archived=True), 5, base) == ("archived.no_answer", {})


def test_archived_wins_over_too_long(base: Settings) -> None:
    too_long = base.max_message_chars + 1
    assert refusal(room(archived=True), too_long, base) == ("archived.no_answer", {})


def test_too_long_refuses_with_the_max(base: Settings) -> None:
    s = replace(base, max_message_chars=100)
    assert refusal(room(), 101, s) == ("message.too_long", {"max": 100})
    assert refusal(room(), 10_000_000, s) == ("message.too_long", {"max": 100})


def test_exactly_the_max_is_fine(base: Settings) -> None:
    s = replace(base, max_message_chars=100)
    assert refusal(room(), 100, s) is None


def test_max_from_the_config() -> None:
    s = settings(access__max_message_chars=7)
    assert refusal(room(), 7, s) is None
    assert refusal(room(), 8, s) == ("message.too_long", {"max": 7})


@pytest.mark.parametrize("language", ["en", "ru"])
def test_refusals_name_texts_that_exist(base: Settings, language: str) -> None:
    s = replace(base, max_message_chars=100)
    archived = refusal(room(archived=True), 5, s)
    too_long = refusal(room(), 101, s)
    assert archived is not None
    assert too_long is not None
    for key, values in (archived, too_long):
        assert key in TEXTS[language]
        assert "{" not in text(language, key, **values)
    assert "100" in text(language, too_long[0], **too_long[1])


# --- RateLimiter ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(per_minute: int, clock: FakeClock) -> RateLimiter:
    return RateLimiter(lambda: per_minute, clock)


def test_n_per_minute_allowed_then_refused() -> None:
    clock = FakeClock()
    rl = limiter(3, clock)
    assert [rl.allow(OWNER) for _ in range(3)] == [True, True, True]
    assert rl.allow(OWNER) is False
    assert rl.allow(OWNER) is False


def test_limit_of_one() -> None:
    clock = FakeClock()
    rl = limiter(1, clock)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)


def test_limit_zero_refuses_everything() -> None:
    rl = limiter(0, FakeClock())
    assert not rl.allow(OWNER)


def test_window_slides_with_the_clock() -> None:
    clock = FakeClock()
    rl = limiter(2, clock)
    assert rl.allow(OWNER)  # t=0
    clock.advance(30)
    assert rl.allow(OWNER)  # t=30
    assert not rl.allow(OWNER)
    clock.advance(30)  # t=60: the first is exactly a minute old, still counted
    assert not rl.allow(OWNER)
    clock.advance(0.5)  # t=60.5: the first has left the window
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)
    clock.advance(30)  # t=90.5: the one at t=30 has left
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)


def test_all_free_again_after_a_quiet_minute() -> None:
    clock = FakeClock()
    rl = limiter(3, clock)
    for _ in range(3):
        assert rl.allow(OWNER)
    clock.advance(61)
    assert [rl.allow(OWNER) for _ in range(4)] == [True, True, True, False]


def test_refused_requests_are_not_counted() -> None:
    clock = FakeClock()
    rl = limiter(2, clock)
    assert rl.allow(OWNER)  # t=0
    assert rl.allow(OWNER)  # t=0
    for _ in range(5):  # hammering while limited, t=0..50
        assert not rl.allow(OWNER)
        clock.advance(10)
    clock.advance(11)  # t=61: both counted ones are out; the refused ones never counted
    assert rl.allow(OWNER)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)


def test_users_are_independent() -> None:
    clock = FakeClock()
    rl = limiter(2, clock)
    assert rl.allow(OWNER)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)
    assert rl.allow(OTHER)
    assert rl.allow(OTHER)
    assert not rl.allow(OTHER)
    assert rl.allow(STRANGER)


def test_limit_is_read_live() -> None:
    clock = FakeClock()
    limit = {"n": 2}
    rl = RateLimiter(lambda: limit["n"], clock)
    assert rl.allow(OWNER)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)
    limit["n"] = 4  # a config save raises it: takes effect at once
    assert rl.allow(OWNER)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)
    limit["n"] = 1  # lowered below what was counted: refused until the window empties
    assert not rl.allow(OWNER)
    clock.advance(61)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)


def test_limit_read_from_settings_getter() -> None:
    clock = FakeClock()
    current = {"s": settings(access__requests_per_minute=1)}
    rl = RateLimiter(lambda: current["s"].requests_per_minute, clock)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)
    current["s"] = settings(access__requests_per_minute=3)
    assert rl.allow(OWNER)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)


def test_default_clock_is_monotonic() -> None:
    rl = RateLimiter(lambda: 1)
    assert rl.allow(OWNER)
    assert not rl.allow(OWNER)
