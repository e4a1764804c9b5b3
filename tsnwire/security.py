"""Frame security, OPC UA Part 14 style (OPC 10000-14, 7.2.4.4.3 and 8.3, PubSub-Aes256-CTR).

A group key is (key id, 32-byte signing key, 32-byte encrypting key, 4-byte key nonce), read from
the device's `key_file`. A published NetworkMessage carries the key id as SecurityTokenId and an
8-byte MessageNonce (4 random bytes + a UInt32 sequence number that grows by one per message of
that publisher); its payload is AES-256-CTR encrypted with the counter block
KeyNonce | MessageNonce | BlockCounter (big-endian, from 1), and everything is signed with
HMAC-SHA256. Sign-only (`gateway.tsn.security: sign`) keeps the payload plain.

A receiver drops, and counts per device, frames that are unsigned or encrypted when they should
not be (policy), signed with an unknown key id, with a bad signature (tampered), with a security
sequence number seen before or older than the replay window (replayed), or whose Timestamp is
older than the late limit (late).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tsnwire.keys import GroupKey, KeyFileError, generate_key_file, load_key_file  # noqa: F401
from tsnwire.uadp import (SECURITY_ENCRYPTED, SECURITY_SIGNED, SIGNATURE_LEN, NetworkMessage,
                          datetime_from_unix_ns, encode_header, unix_ns_from_datetime)

REPLAY_WINDOW = 64  # sequence numbers behind the highest seen that may still arrive (as RFC 4303 3.4.3)

SIGN = "sign"
SIGN_AND_ENCRYPT = "sign_and_encrypt"
SECURITY_MODES = (SIGN_AND_ENCRYPT, SIGN)


def _ctr(key: GroupKey, nonce: bytes, data: bytes) -> bytes:
    counter_block = key.key_nonce + nonce + b"\x00\x00\x00\x01"
    c = Cipher(algorithms.AES(key.encrypting_key), modes.CTR(counter_block)).encryptor()
    return c.update(data) + c.finalize()


class Publisher:
    """Secures the NetworkMessages of one publisher under one key: nonce, encryption, signature."""

    def __init__(self, publisher_id: int, key: GroupKey, mode: str = SIGN_AND_ENCRYPT):
        if mode not in SECURITY_MODES:
            raise ValueError(f"security mode {mode!r}; expected one of {', '.join(SECURITY_MODES)}")
        self.publisher_id, self.key, self.mode = publisher_id, key, mode
        self.flags = SECURITY_SIGNED | (SECURITY_ENCRYPTED if mode == SIGN_AND_ENCRYPT else 0)
        self.sequence = 0  # UInt32 security sequence number (MessageNonce)
        self._salt = secrets.token_bytes(4)

    def seal(self, dataset_writer_id: int, payload: bytes, unix_ns: int | None = None) -> bytes:
        """The whole NetworkMessage (header, payload encrypted if the mode says so, signature)."""
        self.sequence = (self.sequence + 1) & 0xFFFFFFFF
        nonce = self._salt + struct.pack("<I", self.sequence)
        ts = datetime_from_unix_ns(unix_ns if unix_ns is not None else _wall_ns())
        header = encode_header(self.publisher_id, dataset_writer_id, self.sequence, ts, self.flags,
                               self.key.key_id, nonce)
        body = _ctr(self.key, nonce, payload) if self.flags & SECURITY_ENCRYPTED else payload
        signed = header + body
        return signed + hmac.new(self.key.signing_key, signed, hashlib.sha256).digest()


def _wall_ns() -> int:
    return time.time_ns()  # the frame Timestamp is wall time (on site: gPTP-disciplined)


class ReplayWindow:
    """Sliding-window anti-replay over UInt32 sequence numbers (the RFC 4303 3.4.3 algorithm)."""

    def __init__(self, size: int = REPLAY_WINDOW):
        self.size = size
        self.highest = 0
        self.seen = 0  # bit k: highest - k was accepted

    def accept(self, seq: int) -> bool:
        """True (and remembered) if seq is new; False if seen before or too old."""
        if seq > self.highest:
            shift = seq - self.highest
            self.seen = ((self.seen << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = seq
            return True
        behind = self.highest - seq
        if behind >= self.size or self.seen >> behind & 1:
            return False
        self.seen |= 1 << behind
        return True


class Dropped(Exception):
    """A frame the security refused; `reason` is one of unsigned, policy, unknown_key, tampered,
    replayed, late."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Subscriber:
    """Checks and opens the NetworkMessages of one publisher: signature, key id, replay, age."""

    def __init__(self, key: GroupKey, mode: str = SIGN_AND_ENCRYPT, max_age_ns: int = 100_000_000):
        self.key, self.mode, self.max_age_ns = key, mode, max_age_ns
        self.window = ReplayWindow()

    def open(self, msg: NetworkMessage, now_unix_ns: int | None = None) -> bytes:
        """The plain payload of `msg`; raises Dropped (nothing is remembered then)."""
        if not msg.security_flags & SECURITY_SIGNED or len(msg.signature) != SIGNATURE_LEN:
            raise Dropped("unsigned")
        if msg.security_token_id != self.key.key_id:
            raise Dropped("unknown_key", f"SecurityTokenId {msg.security_token_id}")
        expected = hmac.new(self.key.signing_key, msg.header + msg.payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, msg.signature):
            raise Dropped("tampered")
        encrypted = bool(msg.security_flags & SECURITY_ENCRYPTED)
        if self.mode == SIGN_AND_ENCRYPT and not encrypted:
            raise Dropped("policy", "not encrypted")
        now = now_unix_ns if now_unix_ns is not None else _wall_ns()
        age_ns = now - unix_ns_from_datetime(msg.timestamp)
        if age_ns > self.max_age_ns:
            raise Dropped("late", f"{age_ns / 1e6:.1f} ms old")
        if not self.window.accept(msg.security_sequence):
            raise Dropped("replayed", f"sequence {msg.security_sequence}")
        return _ctr(self.key, msg.message_nonce, msg.payload) if encrypted else msg.payload
