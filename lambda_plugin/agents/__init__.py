"""Agent backends: one module each, all behind the :class:`Agent` interface."""

from __future__ import annotations

import logging

import aiohttp

from ..config import AgentSpec
from ..db import Store
from .base import (
    ERROR_TEXTS,
    Agent,
    AgentError,
    AgentReply,
    AgentRequest,
    Attachment,
    ContextInfo,
    PartialCallback,
)
from .echo import EchoAgent
from .lambda_platform import LambdaAgent
from .openai import OpenAIAgent

__all__ = [
    "ERROR_TEXTS",
    "Agent",
    "AgentError",
    "AgentReply",
    "AgentRequest",
    "Attachment",
    "ContextInfo",
    "EchoAgent",
    "LambdaAgent",
    "OpenAIAgent",
    "PartialCallback",
    "create_agent",
]


def create_agent(
    spec: AgentSpec, store: Store, http: aiohttp.ClientSession, log: logging.Logger
) -> Agent:
    """The agent a registry entry describes; ValueError names the first bad option."""
    if spec.backend == "echo":
        return EchoAgent(spec, store, log)
    if spec.backend == "openai":
        return OpenAIAgent(spec, store, http, log)
    if spec.backend == "lambda":
        return LambdaAgent(spec, http, log)
    raise ValueError(f"agents.registry.{spec.agent_id}.backend {spec.backend!r} is unknown")
