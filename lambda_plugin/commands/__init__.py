from .help import HelpCommands

__all__ = ["HelpCommands"]
