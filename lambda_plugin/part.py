"""What every part of the plugin is given."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from .config import Settings


@dataclass(eq=False, kw_only=True)
class Part:
    """The settings in force (a getter: a config edit in the admin UI takes effect at once,
    without rebuilding the parts) and the part's logger."""

    settings: Callable[[], Settings]
    log: logging.Logger


class PartArgs(TypedDict):
    """``Part``'s fields, as keyword arguments for the wiring."""

    settings: Callable[[], Settings]
    log: logging.Logger
