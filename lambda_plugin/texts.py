"""Every user-facing text, per language. Code asks for texts by key; none is built twice."""

from __future__ import annotations

# (command usage, one-line description) in the order !help lists them.
COMMANDS: list[tuple[str, dict[str, str]]] = [
    ("!help", {"en": "list the commands", "ru": "список команд"}),
    ("!new [name]", {"en": "new chat room in your Space", "ru": "новый чат в вашем пространстве"}),
    (
        "!chats [archived]",
        {"en": "your chats (or the archived ones)", "ru": "ваши чаты (или архивные)"},
    ),
    ("!rename <name>", {"en": "rename this chat", "ru": "переименовать этот чат"}),
    (
        "!archive",
        {
            "en": "archive this chat (history kept)",
            "ru": "архивировать этот чат (история сохраняется)",
        },
    ),
    ("!unarchive", {"en": "bring this chat back", "ru": "вернуть этот чат из архива"}),
    (
        "!clear",
        {"en": "start this chat's conversation afresh", "ru": "начать разговор в этом чате заново"},
    ),
    (
        "!save <name>",
        {"en": "save this conversation as a snapshot", "ru": "сохранить разговор как снимок"},
    ),
    (
        "!load <name>",
        {"en": "continue this chat from a snapshot", "ru": "продолжить чат из снимка"},
    ),
    ("!cancel", {"en": "stop the running answer", "ru": "остановить текущий ответ"}),
    (
        "!retry",
        {
            "en": "send the last unanswered message again",
            "ru": "повторить последнее сообщение без ответа",
        },
    ),
    (
        "!context",
        {"en": "this chat's agent, id and size", "ru": "агент, идентификатор и размер этого чата"},
    ),
    (
        "!agent [id]",
        {"en": "show or switch this chat's agent", "ru": "показать или сменить агента чата"},
    ),
    (
        "!lambda status|reconcile|reset",
        {"en": "admin: status and maintenance", "ru": "админ: состояние и обслуживание"},
    ),
]

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "help.title": "**Lambda** — talk to AI agents. Each chat room is its own conversation.",
        "not_yet": "`{command}` is not yet available in this version.",
        "default_chat_name": "Chat {n}",
    },
    "ru": {
        "help.title": "**Lambda** — разговор с ИИ-агентами. Каждый чат — отдельный разговор.",
        "not_yet": "`{command}` пока недоступна в этой версии.",
        "default_chat_name": "Чат {n}",
    },
}


def text(language: str, key: str, **values: object) -> str:
    """The text ``key`` in ``language`` (English where missing), with values filled in."""
    template = TEXTS.get(language, {}).get(key) or TEXTS["en"][key]
    return template.format(**values) if values else template


def help_text(language: str) -> str:
    lines = [text(language, "help.title"), ""]
    for usage, description in COMMANDS:
        lines.append(f"- `{usage}` — {description.get(language) or description['en']}")
    return "\n".join(lines)
