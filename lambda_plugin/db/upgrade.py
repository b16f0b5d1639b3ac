"""Schema migrations. Shipped steps are never edited: add ``upgrade_vN+1`` instead."""

from __future__ import annotations

from mautrix.util.async_db import Connection, UpgradeTable

upgrade_table = UpgradeTable()


# mautrix types register() as taking the function, not as the decorator factory it also is.
@upgrade_table.register(description="Initial schema: users, chat rooms, snapshots, history")  # type: ignore[call-arg, arg-type]
async def upgrade_v1(conn: Connection) -> None:
    # One row per user who has (or is getting) a Space. space_id is unique: one Space per user.
    await conn.execute(
        """CREATE TABLE lambda_user (
            user_id          TEXT PRIMARY KEY,
            space_id         TEXT UNIQUE,
            next_chat_index  INTEGER NOT NULL DEFAULT 1,
            created_at       BIGINT NOT NULL
        )"""
    )
    # One row per managed chat room; chat_id (C1, C2, ...) is unique per user and
    # platform_chat_id, the only key the agent side sees, is unique everywhere.
    await conn.execute(
        """CREATE TABLE chat_room (
            room_id           TEXT PRIMARY KEY,
            user_id           TEXT NOT NULL REFERENCES lambda_user(user_id) ON DELETE CASCADE,
            chat_id           TEXT NOT NULL,
            name              TEXT NOT NULL,
            agent_id          TEXT NOT NULL,
            platform_chat_id  TEXT NOT NULL UNIQUE,
            archived          BOOLEAN NOT NULL DEFAULT false,
            gone              BOOLEAN NOT NULL DEFAULT false,
            created_at        BIGINT NOT NULL,
            UNIQUE (user_id, chat_id)
        )"""
    )
    # Named conversation snapshots of a user (!save / !load); held only here.
    await conn.execute(
        """CREATE TABLE snapshot (
            user_id           TEXT NOT NULL,
            name              TEXT NOT NULL,
            agent_id          TEXT NOT NULL,
            platform_chat_id  TEXT NOT NULL,
            messages          TEXT NOT NULL,
            created_at        BIGINT NOT NULL,
            PRIMARY KEY (user_id, name)
        )"""
    )
    # Conversation history of stateless backends (echo, openai), per platform_chat_id.
    await conn.execute(
        """CREATE TABLE history (
            platform_chat_id  TEXT NOT NULL,
            seq               INTEGER NOT NULL,
            role              TEXT NOT NULL,
            content           TEXT NOT NULL,
            created_at        BIGINT NOT NULL,
            PRIMARY KEY (platform_chat_id, seq)
        )"""
    )
    # Events already handled, so a redelivery or a restart never answers twice.
    await conn.execute(
        """CREATE TABLE handled_event (
            event_id    TEXT PRIMARY KEY,
            room_id     TEXT NOT NULL,
            handled_at  BIGINT NOT NULL
        )"""
    )
    await conn.execute("CREATE INDEX handled_event_room_idx ON handled_event (room_id, handled_at)")


@upgrade_table.register(description="Small key-value state: the sync position catch-up reads from")  # type: ignore[call-arg, arg-type]
async def upgrade_v2(conn: Connection) -> None:
    await conn.execute(
        """CREATE TABLE plugin_state (
            key    TEXT PRIMARY KEY,
            value  TEXT NOT NULL
        )"""
    )


@upgrade_table.register(description="Usage: tokens in and out per user, chat room and UTC day")  # type: ignore[call-arg, arg-type]
async def upgrade_v3(conn: Connection) -> None:
    # Held only here: a lost database loses the usage counted so far (quotas start afresh).
    # day is the UTC date as 'YYYY-MM-DD', so text order is date order on both engines.
    await conn.execute(
        """CREATE TABLE usage (
            user_id     TEXT NOT NULL,
            room_id     TEXT NOT NULL,
            day         TEXT NOT NULL,
            tokens_in   BIGINT NOT NULL DEFAULT 0,
            tokens_out  BIGINT NOT NULL DEFAULT 0,
            requests    BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, room_id, day)
        )"""
    )
    await conn.execute("CREATE INDEX usage_day_idx ON usage (day)")
    await conn.execute("CREATE INDEX usage_room_idx ON usage (room_id, day)")


@upgrade_table.register(description="The ledger: one row per message and command, its fate")  # type: ignore[call-arg, arg-type]
async def upgrade_v4(conn: Connection) -> None:
    # One row per user event the plugin sees (messages and commands), keyed by event id:
    # seen -> taken -> one end (answered, refused, left, kept, superseded). ``event`` holds
    # the event as JSON while it may still be run (not ended, or kept for !retry);
    # ``answer_event`` the bot's first event of its answer (a stream's), to finish it.
    await conn.execute(
        """CREATE TABLE ledger (
            event_id      TEXT PRIMARY KEY,
            room_id       TEXT NOT NULL,
            sender        TEXT NOT NULL,
            kind          TEXT NOT NULL,
            state         TEXT NOT NULL,
            reason        TEXT NOT NULL DEFAULT '',
            ts            BIGINT NOT NULL,
            event         TEXT,
            answer_event  TEXT,
            updated_at    BIGINT NOT NULL
        )"""
    )
    await conn.execute("CREATE INDEX ledger_room_state_idx ON ledger (room_id, state, ts)")
    await conn.execute("CREATE INDEX ledger_state_idx ON ledger (state)")
    await conn.execute("CREATE INDEX ledger_updated_idx ON ledger (updated_at)")
    # What the handled log knew: each event ended (which end is not known: answered).
    await conn.execute(
        "INSERT INTO ledger (event_id, room_id, sender, kind, state, reason, ts, updated_at)"
        " SELECT event_id, room_id, '', 'message', 'answered', 'migrated', handled_at,"
        " handled_at FROM handled_event"
    )
    await conn.execute("DROP TABLE handled_event")
    # The message a history turn belongs to: a re-asked message replaces its turn.
    await conn.execute("ALTER TABLE history ADD COLUMN message_id TEXT")


@upgrade_table.register(description="Rooms joined on users' invites, counted per inviter")  # type: ignore[call-arg, arg-type]
async def upgrade_v5(conn: Connection) -> None:
    # One row per room the bot joined for ``inviter`` that is none of the plugin's own (their
    # DM with the bot, rooms of theirs): access.max_joins_per_inviter counts them. Held only
    # here: rooms joined before this step are not counted.
    await conn.execute(
        """CREATE TABLE joined_room (
            room_id    TEXT PRIMARY KEY,
            inviter    TEXT NOT NULL,
            joined_at  BIGINT NOT NULL
        )"""
    )
    await conn.execute("CREATE INDEX joined_room_inviter_idx ON joined_room (inviter)")


@upgrade_table.register(description="The ledger names the message an edit or a 🔁 re-answers")  # type: ignore[call-arg, arg-type]
async def upgrade_v6(conn: Connection) -> None:
    # ``replaces``: for an edit, its original; for a 🔁, the message it answers again. The
    # conversation turn a row is (its own id when null) decides which message is the latest.
    await conn.execute("ALTER TABLE ledger ADD COLUMN replaces TEXT")
    await conn.execute("CREATE INDEX ledger_replaces_idx ON ledger (replaces)")


@upgrade_table.register(description="Where each file a user sent landed in the workspace")  # type: ignore[call-arg, arg-type]
async def upgrade_v7(conn: Connection) -> None:
    # One row per file message written into the workspace: its path relative to the root (the
    # name has a timestamp, so a reply to the message can't derive it). Keyed by room too: an
    # event id named from another room never finds this room's file. Pruned by ``ts``.
    await conn.execute(
        """CREATE TABLE file_place (
            room_id   TEXT NOT NULL,
            event_id  TEXT NOT NULL,
            path      TEXT NOT NULL,
            ts        BIGINT NOT NULL,
            PRIMARY KEY (room_id, event_id)
        )"""
    )
    await conn.execute("CREATE INDEX file_place_ts_idx ON file_place (ts)")
