"""Encrypted attachments: files in encrypted rooms, opened and made with mautrix's own helpers.

In an encrypted room a file is uploaded as AES-CTR ciphertext (the same length as the file)
and its message carries ``file``, an EncryptedFile: the ciphertext's ``mxc://`` url, the key
(a JSON Web Key), the iv, the SHA-256 of the ciphertext and the version ``v2``. Everything
the event says is checked here before a byte is downloaded; the hash is checked before a
byte is decrypted.

The helpers (``mautrix.crypto.attachments``) need pycryptodome and python-olm, which maubot
installs with its ``encryption`` extra; without them :class:`NoCrypto` is raised, and the
callers refuse the file rather than download what they cannot open or send in the clear
what should be encrypted.
"""

from __future__ import annotations

import asyncio
import base64
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mautrix.errors import DecryptionError
from mautrix.types import EncryptedFile

KEY_BYTES = 32  # AES-256
IV_BYTES = 16
SHA256_BYTES = 32

# Unpadded base64, standard or URL-safe (the key is URL-safe, the iv and hash standard).
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")


class Undecryptable(ValueError):
    """The event's ``file`` cannot be opened: malformed, or the ciphertext does not match."""


class NoCrypto(RuntimeError):
    """mautrix's attachment crypto cannot be imported (maubot without its encryption extra)."""


@dataclass(frozen=True)
class Sealed:
    """A checked EncryptedFile: where the ciphertext is and what opens it, as the event gave
    them (``url`` still to be checked as an ``mxc://`` URI by the caller)."""

    url: Any
    key: str
    iv: str
    sha256: str


def crypto() -> ModuleType:
    """``mautrix.crypto.attachments``; NoCrypto when it cannot be imported."""
    try:
        from mautrix.crypto import attachments
    except ImportError as e:  # pycryptodome or python-olm missing
        raise NoCrypto(f"mautrix's attachment crypto is unavailable: {e}") from e
    return attachments


def sealed_file(raw: Any) -> Sealed:
    """The EncryptedFile of an event, checked; Undecryptable (never anything else) when it is
    not an object, its version is not ``v2``, or its key, iv or hash is missing or garbled."""
    if not isinstance(raw, dict):
        raise Undecryptable(f"file is a {type(raw).__name__}, not an object")
    if raw.get("v") != "v2":
        raise Undecryptable(f"version {_shown(raw.get('v'))}, not v2")
    jwk = raw.get("key")
    if not isinstance(jwk, dict):
        raise Undecryptable("no key object")
    if jwk.get("kty", "oct") != "oct" or jwk.get("alg", "A256CTR") != "A256CTR":
        raise Undecryptable(f"key {_shown(jwk.get('kty'))}/{_shown(jwk.get('alg'))}")
    hashes = raw.get("hashes")
    return Sealed(
        url=raw.get("url"),
        key=_base64("key", jwk.get("k"), KEY_BYTES),
        iv=_base64("iv", raw.get("iv"), IV_BYTES),
        sha256=_base64(
            "sha256 hash", hashes.get("sha256") if isinstance(hashes, dict) else None, SHA256_BYTES
        ),
    )


def _base64(what: str, value: Any, size: int) -> str:
    """``value``, refused unless it is unpadded base64 of ``size`` bytes."""
    if not isinstance(value, str) or len(value) > 4 * size or not _BASE64.fullmatch(value):
        raise Undecryptable(f"{what} is not base64: {_shown(value)}")
    bare = value.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        decoded = base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
    except ValueError as e:  # binascii.Error: a length no base64 has
        raise Undecryptable(f"{what} is not base64: {_shown(value)}") from e
    if len(decoded) != size:
        raise Undecryptable(f"{what} has {len(decoded)} bytes, not {size}")
    return value


def _shown(value: Any) -> str:
    """A value from the event as the log may show it: short."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:60] + "…"


async def open_sealed(ciphertext: bytearray, sealed: Sealed) -> bytearray:
    """The plaintext, decrypted in place in ``ciphertext`` (in a thread): the SHA-256 of the
    ciphertext is compared with the event's first, and on a mismatch nothing is decrypted
    (Undecryptable). NoCrypto without the helpers."""
    helpers = crypto()
    try:
        await asyncio.to_thread(
            helpers.decrypt_attachment, ciphertext, sealed.key, sealed.sha256, sealed.iv, True
        )
    except (DecryptionError, ValueError) as e:
        raise Undecryptable(str(e) or type(e).__name__) from e
    return ciphertext


async def seal(plaintext: bytes) -> tuple[bytes, EncryptedFile]:
    """The ciphertext of ``plaintext`` under a new random key (in a thread) and the
    EncryptedFile that opens it, its ``url`` still unset. NoCrypto without the helpers."""
    helpers = crypto()
    ciphertext, sealed = await asyncio.to_thread(helpers.encrypt_attachment, plaintext)
    return ciphertext, sealed
