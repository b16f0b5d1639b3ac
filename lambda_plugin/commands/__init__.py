from .chats import ChatCommands
from .help import HelpCommands

__all__ = ["ChatCommands", "HelpCommands"]
