"""Group key files for TSN frame security (light: the site loader checks them without crypto imports).

A key file is JSON: {"key_id": 1, "signing_key": <64 hex>, "encrypting_key": <64 hex>,
"key_nonce": <8 hex>}, the key material of the PubSub-Aes256-CTR policy (OPC 10000-14, 8.3).
Generated at commissioning or test time (generate_key_file), mode 0600, never committed.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

SIGNING_KEY_LEN = 32  # PubSub-Aes256-CTR: HMAC-SHA256 key length (OPC 10000-14, 8.3.2)
ENCRYPTING_KEY_LEN = 32  # AES-256
KEY_NONCE_LEN = 4


class KeyFileError(ValueError):
    """A key file that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class GroupKey:
    key_id: int
    signing_key: bytes
    encrypting_key: bytes
    key_nonce: bytes


def generate_key_file(path: str | Path, key_id: int = 1) -> GroupKey:
    """Write a fresh random group key to `path` (mode 0600) and return it; for tests and commissioning."""
    key = GroupKey(key_id, secrets.token_bytes(SIGNING_KEY_LEN), secrets.token_bytes(ENCRYPTING_KEY_LEN),
                   secrets.token_bytes(KEY_NONCE_LEN))
    text = json.dumps({"key_id": key.key_id, "signing_key": key.signing_key.hex(),
                       "encrypting_key": key.encrypting_key.hex(), "key_nonce": key.key_nonce.hex()})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return key


def load_key_file(path: str | Path) -> GroupKey:
    """The group key in a key file (JSON: key_id, signing_key, encrypting_key, key_nonce in hex)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a JSON key file") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"{path}: not a JSON key file")
    try:
        key = GroupKey(int(doc["key_id"]), bytes.fromhex(doc["signing_key"]), bytes.fromhex(doc["encrypting_key"]),
                       bytes.fromhex(doc["key_nonce"]))
    except KeyError as exc:
        raise KeyFileError(f"{path}: no {exc.args[0]}") from None
    except (TypeError, ValueError):
        raise KeyFileError(f"{path}: key_id must be an integer and the keys hex strings") from None
    lengths = ((key.signing_key, SIGNING_KEY_LEN, "signing_key"), (key.encrypting_key, ENCRYPTING_KEY_LEN,
               "encrypting_key"), (key.key_nonce, KEY_NONCE_LEN, "key_nonce"))
    for value, length, name in lengths:
        if len(value) != length:
            raise KeyFileError(f"{path}: {name} must be {length} bytes, got {len(value)}")
    if not 0 < key.key_id < 2**32:
        raise KeyFileError(f"{path}: key_id must be 1..4294967295")
    return key
