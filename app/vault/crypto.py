"""Encryption of secrets at rest: AES-256-GCM, bound to the tenant and the secret's name.

A sealed value is ``b"\\x01" + key id (4 bytes) + nonce (12 bytes) + ciphertext``. The associated
data is ``"<tenant id>/<name>"``, so a ciphertext copied to another tenant or name does not open.
Several keys may be configured (``STEWARD_SECRET_KEYS``, comma-separated, newest first): new values
are sealed with the first, and any of them opens what it sealed, so keys can be rotated.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = 1


class VaultError(Exception):
    """A secret could not be opened (wrong or missing key, or a tampered value)."""


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _decode(key: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(key.strip() + "=" * (-len(key.strip()) % 4))
    except ValueError as exc:
        raise VaultError("a secret key is not valid base64") from exc
    if len(raw) != 32:
        raise VaultError("a secret key must be 32 bytes, base64url-encoded: see docs/operations.md, Secrets")
    return raw


class Vault:
    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise VaultError("no secret key configured")
        self._keys = [(hashlib.sha256(raw).digest()[:4], AESGCM(raw)) for raw in map(_decode, keys)]

    @staticmethod
    def _aad(tenant_id: uuid.UUID, name: str) -> bytes:
        return f"{tenant_id}/{name}".encode()

    def seal(self, tenant_id: uuid.UUID, name: str, value: str) -> bytes:
        key_id, aead = self._keys[0]
        nonce = os.urandom(12)
        return bytes([FORMAT]) + key_id + nonce + aead.encrypt(nonce, value.encode(), self._aad(tenant_id, name))

    def open(self, tenant_id: uuid.UUID, name: str, sealed: bytes) -> str:
        if len(sealed) < 17 or sealed[0] != FORMAT:
            raise VaultError(f"secret {name!r} is not in a known format")
        key_id, nonce, ciphertext = sealed[1:5], sealed[5:17], sealed[17:]
        for candidate_id, aead in self._keys:
            if candidate_id == key_id:
                try:
                    return aead.decrypt(nonce, ciphertext, self._aad(tenant_id, name)).decode()
                except InvalidTag as exc:
                    raise VaultError(f"secret {name!r} does not open: tampered or moved") from exc
        raise VaultError(f"secret {name!r} was sealed with a key that is not configured")


def load_keys(configured: str | None, data_dir: Path) -> list[str]:
    """Keys from ``STEWARD_SECRET_KEYS``; without it, a key file under the data directory (made on first use)."""
    if configured:
        return [key for key in configured.split(",") if key.strip()]
    path = data_dir / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key() + "\n")
    return [line for line in path.read_text().split() if line]
