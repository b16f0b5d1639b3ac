"""Makes the agent a registry entry describes."""

from __future__ import annotations

import logging

import aiohttp

from ..agent_config import AgentSpec
from ..db import Store
from .base import Agent
from .echo import EchoAgent
from .lambda_platform import LambdaAgent
from .openai import OpenAIAgent


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
