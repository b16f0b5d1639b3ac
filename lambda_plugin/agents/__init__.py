"""Agent backends: one module each, all behind the :class:`Agent` interface."""

from __future__ import annotations

from .base import (
    ERROR_TEXTS,
    Agent,
    AgentError,
    AgentReply,
    AgentRequest,
    Attachment,
    ContextInfo,
    PartialCallback,
    Usage,
)
from .echo import EchoAgent
from .factory import create_agent
from .lambda_platform import LambdaAgent
from .openai import OpenAIAgent
from .pool import Agents

__all__ = [
    "ERROR_TEXTS",
    "Agent",
    "AgentError",
    "AgentReply",
    "AgentRequest",
    "Agents",
    "Attachment",
    "ContextInfo",
    "EchoAgent",
    "LambdaAgent",
    "OpenAIAgent",
    "PartialCallback",
    "Usage",
    "create_agent",
]

