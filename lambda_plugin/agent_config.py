"""What an agent's entry of the config says: its spec, the reader each backend checks its own
options with, and how voice messages to it are transcribed."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from yarl import URL

MB = 1024 * 1024


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


class Options:
    """Reads a map of options, naming the exact config key in every error (never a value:
    it could be a secret)."""

    def __init__(self, values: dict[str, Any], prefix: str) -> None:
        self.values = values
        self.prefix = prefix

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.values.get(key)
        if value is None or value == "":
            if required:
                raise ValueError(f"{self.prefix}.{key} is required")
            return None
        if not isinstance(value, str):
            raise ValueError(f"{self.prefix}.{key} must be a text")
        return value

    def url(self, key: str) -> URL:
        url = URL(self.text(key, required=True) or "")  # required: never None here
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"{self.prefix}.{key} must be an http(s) URL")
        if url.user is not None or url.password is not None:
            # Secrets belong in their own option, which goes into a header and nowhere else.
            raise ValueError(f"{self.prefix}.{key} must not hold credentials")
        return url

    def number(self, key: str, default: float) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{self.prefix}.{key} must be a positive number")
        return float(value)

    def count(self, key: str, default: int) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{self.prefix}.{key} must be a whole number, 0 or more")
        return value

    def whole(self, key: str, default: int) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{self.prefix}.{key} must be a positive whole number")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.prefix}.{key} must be true or false")
        return value

    def warn_unknown(self, log: logging.Logger, known: Collection[str]) -> None:
        # Only a warning: refusing unknown keys would break configs written for other versions.
        for key in sorted(set(self.values) - set(known)):
            log.warning("Ignoring unknown option %s.%s", self.prefix, key)


class AgentOptions(Options):
    """One agent's options, read by its backend."""

    def __init__(self, spec: AgentSpec) -> None:
        super().__init__(spec.options, f"agents.registry.{spec.agent_id}")


@dataclass(frozen=True)
class TranscriptionSpec:
    """An OpenAI-compatible ``POST {base_url}/audio/transcriptions`` for voice messages."""

    base_url: URL
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a log line
    max_mb: float = 25.0  # larger audio is refused before it is sent
    timeout_s: float = 120.0  # for the whole request

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)


TRANSCRIPTION_KEYS = ("base_url", "model", "api_key", "max_mb", "timeout_s")


def _transcription(value: Any, key: str) -> TranscriptionSpec | None:
    """A ``transcription`` map, or None for null or false (no transcription)."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a map of {', '.join(TRANSCRIPTION_KEYS)}, or null")
    unknown = sorted(set(map(str, value)) - set(TRANSCRIPTION_KEYS))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a transcription option")
    options = Options(value, key)
    return TranscriptionSpec(
        base_url=options.url("base_url"),
        model=options.text("model", required=True) or "",  # required: never empty here
        api_key=options.text("api_key"),
        max_mb=options.number("max_mb", TranscriptionSpec.max_mb),
        timeout_s=options.number("timeout_s", TranscriptionSpec.timeout_s),
    )


def _agent_transcription(agents: dict[str, AgentSpec]) -> dict[str, TranscriptionSpec | None]:
    """The agents with a transcription of their own (None: false, none at all); an agent
    without the option, or with null, uses the top-level one."""
    own: dict[str, TranscriptionSpec | None] = {}
    for agent_id, spec in agents.items():
        value = spec.options.get("transcription")
        if value is not None:
            own[agent_id] = _transcription(value, f"agents.registry.{agent_id}.transcription")
    return own
