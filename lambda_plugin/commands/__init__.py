from collections.abc import Iterable

from maubot.handlers.command import CommandHandler

from .admin import AdminCommands
from .base import CommandArgs, CommandBase
from .chats import ChatCommands
from .context import ContextCommands
from .help import HelpCommands
from .usage import UsageCommands

__all__ = [
    "AdminCommands",
    "ChatCommands",
    "CommandArgs",
    "CommandBase",
    "ContextCommands",
    "HelpCommands",
    "UsageCommands",
    "command_names",
]


def command_names(classes: Iterable[type]) -> frozenset[str]:
    """The names of the commands the classes register (each `!name` maubot answers)."""
    names = set()
    for cls in classes:
        for value in vars(cls).values():
            if isinstance(value, CommandHandler) and value.__mb_parent__ is None:
                names.add(value.__mb_get_name__(None))
    return frozenset(names)
