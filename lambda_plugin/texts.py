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
        "refused": "Sorry, this bot is not open to you. Ask its operator for access.",
        "refused.reason": "not allowed to use this bot",
        "welcome": (
            "Welcome to **{name}**. Write here to talk to the agent `{agent}`; "
            "each chat room is its own conversation. `!help` lists the commands."
        ),
        "space.exists": "You already have your Space: [{name}]({link}). I've invited you back.",
        "space.ready": "Your Space is ready: accept the invites to **{name}** and its first chat.",
        "not_chat_room": "This command works in one of your chat rooms.",
        "name.empty": "Please give a name, e.g. `{example}`.",
        "name.too_long": "That name is too long: at most {max} characters.",
        "new.created": "Created **{name}**: {link} (you're invited).",
        "new.too_many": "You have {max} chats, the most allowed. Archive one you no longer need.",
        "chats.title": "Your chats:",
        "chats.archived_title": "Your archived chats:",
        "chats.none": "You have no chats yet. `!new` makes one.",
        "chats.none_archived": "You have no archived chats.",
        "chats.line": "{name} ({chat_id}) — {link} — agent `{agent}`",
        "chats.current": "← this room",
        "chats.usage": "Usage: `!chats` or `!chats archived`.",
        "renamed": "Renamed to **{name}**.",
        "archived": "Archived: this room left your Space; its history stays. `!unarchive` brings it back.",
        "already_archived": "This chat is already archived.",
        "unarchived": "Back in your Space: **{name}**.",
        "not_archived": "This chat is not archived.",
        "error.homeserver": "The homeserver refused that just now; please try again in a moment.",
    },
    "ru": {
        "help.title": "**Lambda** — разговор с ИИ-агентами. Каждый чат — отдельный разговор.",
        "not_yet": "`{command}` пока недоступна в этой версии.",
        "default_chat_name": "Чат {n}",
        "refused": "Извините, этот бот вам недоступен. Попросите доступ у администратора.",
        "refused.reason": "нет доступа к этому боту",
        "welcome": (
            "Добро пожаловать в **{name}**. Пишите здесь, чтобы говорить с агентом `{agent}`; "
            "каждый чат — отдельный разговор. `!help` покажет команды."
        ),
        "space.exists": "У вас уже есть пространство: [{name}]({link}). Я пригласил вас снова.",
        "space.ready": "Ваше пространство готово: примите приглашения в **{name}** и первый чат.",
        "not_chat_room": "Эта команда работает в одном из ваших чатов.",
        "name.empty": "Укажите название, например `{example}`.",
        "name.too_long": "Слишком длинное название: не больше {max} символов.",
        "new.created": "Создан чат **{name}**: {link} (вы приглашены).",
        "new.too_many": "У вас уже {max} чатов, это предел. Архивируйте ненужный.",
        "chats.title": "Ваши чаты:",
        "chats.archived_title": "Ваши архивные чаты:",
        "chats.none": "У вас ещё нет чатов. `!new` создаст новый.",
        "chats.none_archived": "У вас нет архивных чатов.",
        "chats.line": "{name} ({chat_id}) — {link} — агент `{agent}`",
        "chats.current": "← этот чат",
        "chats.usage": "Использование: `!chats` или `!chats archived`.",
        "renamed": "Переименовано в **{name}**.",
        "archived": "В архиве: чат убран из пространства, история сохранена. `!unarchive` вернёт его.",
        "already_archived": "Этот чат уже в архиве.",
        "unarchived": "Снова в пространстве: **{name}**.",
        "not_archived": "Этот чат не в архиве.",
        "error.homeserver": "Сервер сейчас отказал; попробуйте ещё раз чуть позже.",
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
