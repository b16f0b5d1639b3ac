from .admin import AdminCommands
from .chats import ChatCommands
from .context import ContextCommands
from .help import HelpCommands

__all__ = ["AdminCommands", "ChatCommands", "ContextCommands", "HelpCommands"]
