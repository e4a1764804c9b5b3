"""OPC UA users and their roles: `<data-dir>/users.yaml`, `cmcs users`, and asyncua's user manager.

A user has one role (Viewer < Operator < Engineer < Admin, docs/interface.md section 4), a password
stored as an scrypt hash, and/or X509 user certificates known by their SHA-1 thumbprint. The
file is private (0600) and re-read when it changes, so `cmcs users add` takes effect on the
running gateway at the next login.

Every session gets asyncua's `UserRole.User`, never `UserRole.Admin` (which skips asyncua's
AccessLevel checks on writes): our own role travels in `GatewayUser.cmcs_role` and is
enforced by the command service and by `gateway.security`.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import logging
import re
import secrets
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

from gateway.datadir import prepare_data_dir
from gateway.pki import load_certificate_file, thumbprint_of, write_private
from siteconfig.errors import CliError

log = logging.getLogger(__name__)

ROLES = ("Viewer", "Operator", "Engineer", "Admin")
ANONYMOUS_ROLE = "Viewer"
USERS_FILE = "users.yaml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 8

# scrypt cost: N=2^15, r=8, p=1 is 32 MiB and ~0.1 s per check on this class of machine
# (Percival's "interactive login" setting, doubled); stored with each hash so it can be raised.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_SALT_BYTES, SCRYPT_KEY_BYTES = 16, 32
SCRYPT_MAXMEM = 256 * 2**20

# The identity token of the ActivateSession being served ("anonymous", "username", "x509"), set by
# gateway.security: asyncua gives the user manager the channel certificate for every token type.
TOKEN_KIND: contextvars.ContextVar[str | None] = contextvars.ContextVar("cmcs_token_kind", default=None)
# The client's address, for the log lines of a refused login.
PEER: contextvars.ContextVar[str] = contextvars.ContextVar("cmcs_peer", default="?")


# ---- passwords ----------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """`scrypt$N$r$p$salt$key` with a random salt (base64 fields)."""
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         maxmem=SCRYPT_MAXMEM, dklen=SCRYPT_KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches the stored scrypt hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                                p=int(p), maxmem=SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# a hash of a random password: unknown user names cost the same time as wrong passwords
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_hex(16))
    return _DUMMY_HASH


# ---- the user file ------------------------------------------------------------------------------
@dataclass
class UserRecord:
    name: str
    role: str
    password: str | None = None  # scrypt hash
    certificates: list[str] = field(default_factory=list)  # SHA-1 thumbprints, lower-case hex

    def to_yaml(self) -> dict:
        out: dict = {"role": self.role}
        if self.password:
            out["password"] = self.password
        if self.certificates:
            out["certificates"] = list(self.certificates)
        return out


def users_path(data_dir: Path) -> Path:
    return Path(data_dir) / USERS_FILE


def load_users(path: Path) -> dict[str, UserRecord]:
    """The users of a users.yaml (an empty dict when the file does not exist)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    users = doc.get("users") or {}
    if not isinstance(users, dict):
        raise ValueError(f"{path}: 'users' must be a mapping")
    out: dict[str, UserRecord] = {}
    for name, entry in users.items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            raise ValueError(f"{path}: user {name!r}: role must be one of {', '.join(ROLES)}")
        certs = entry.get("certificates") or []
        out[str(name)] = UserRecord(str(name), entry["role"], entry.get("password"),
                                    [str(c).lower() for c in certs])
    return out


def save_users(path: Path, users: dict[str, UserRecord]) -> None:
    """Write users.yaml atomically, readable by its owner only (0600)."""
    path = Path(path)
    doc = {"users": {name: users[name].to_yaml() for name in sorted(users)}}
    text = ("# cmcs-gateway OPC UA users; managed with `cmcs users`. Passwords are scrypt hashes\n"
            "# (scrypt$N$r$p$salt$key); certificates are SHA-1 thumbprints of X509 user certificates.\n"
            + yaml.safe_dump(doc, sort_keys=False))
    write_private(path, text.encode(), 0o600)


# ---- asyncua's hook ---------------------------------------------------------------------------------
@dataclass
class GatewayUser(User):
    """A logged-in client: asyncua role User (no bypass), our role in `cmcs_role`."""

    cmcs_role: str = "Viewer"
    token: str = "anonymous"


class GatewayUserManager(UserManager):
    """asyncua `UserManager`: Anonymous (Viewer, if allowed), UserName (scrypt), X509 (thumbprint)."""

    def __init__(self, path: Path, allow_anonymous: bool = True):
        self.path = Path(path)
        self.allow_anonymous = allow_anonymous
        self._users: dict[str, UserRecord] = {}
        self._by_thumbprint: dict[str, UserRecord] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self.reload()

    @property
    def count(self) -> int:
        """Users known now (as last read from users.yaml)."""
        return len(self._users)

    def reload(self) -> None:
        """Re-read users.yaml if it changed since the last read."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp == self._stamp and self._stamp is not None:
                return
            try:
                users = load_users(self.path)
            except (ValueError, OSError) as exc:
                log.error("users file not loaded, keeping the previous users: %s", exc)
                return
            self._users = users
            self._by_thumbprint = {t: u for u in users.values() for t in u.certificates}
            self._stamp = stamp

    def get_user(self, iserver, username=None, password=None, certificate=None) -> User | None:
        self.reload()
        kind = TOKEN_KIND.get()
        if kind is None:  # not through gateway.security's hook: infer the token
            kind = "username" if username is not None else ("x509" if certificate is not None else "anonymous")
        peer = PEER.get()
        if kind == "anonymous":
            if not self.allow_anonymous:
                log.warning("login refused from %s: anonymous access is switched off", peer)
                return None
            return GatewayUser(role=UserRole.User, name="anonymous", cmcs_role=ANONYMOUS_ROLE, token=kind)
        if kind == "username":
            record = self._users.get(username or "")
            stored = record.password if record is not None and record.password else _dummy_hash()
            if not verify_password(password or "", stored) or record is None or not record.password:
                log.warning("login refused from %s: wrong user name or password (user %r)", peer, username)
                return None
            return GatewayUser(role=UserRole.User, name=record.name, cmcs_role=record.role, token=kind)
        if kind == "x509":
            thumb = hashlib.sha1(certificate).hexdigest() if isinstance(certificate, bytes | bytearray) else ""
            record = self._by_thumbprint.get(thumb)
            if record is None:
                log.warning("login refused from %s: X509 user certificate %s belongs to no user", peer, thumb)
                return None
            return GatewayUser(role=UserRole.User, name=record.name, cmcs_role=record.role, token=kind)
        return None


def session_role(user) -> tuple[str, str]:
    """(name, role) of an asyncua session user; anything unknown is the least-privileged Viewer."""
    if isinstance(user, GatewayUser):
        return user.name or "?", user.cmcs_role
    return (getattr(user, "name", None) or "anonymous"), "Viewer"


# ---- cmcs users ----------------------------------------------------------------------------------
def _data_dir(args) -> Path:
    return prepare_data_dir(args.data_dir)


def _load_for_cli(path: Path) -> dict[str, UserRecord]:
    try:
        return load_users(path)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _read_password_stdin() -> str:
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CliError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def set_user(data_dir: Path, name: str, role: str, *, password: str | None = None,
             certificate_thumbprint: str | None = None) -> UserRecord:
    """Add or update a user in `<data-dir>/users.yaml` (what `cmcs users add` does)."""
    if not NAME_RE.match(name) or name == "anonymous":
        raise ValueError(f"bad user name {name!r}: letters, digits, '.', '_', '@', '-'; at most 64; not 'anonymous'")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    Path(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    path = users_path(data_dir)
    users = load_users(path)
    record = users.get(name) or UserRecord(name, role)
    record.role = role
    if password is not None:
        record.password = hash_password(password)
    if certificate_thumbprint:
        thumb = certificate_thumbprint.lower()
        for other in users.values():
            if other.name != name and thumb in other.certificates:
                raise ValueError(f"certificate {thumb} already belongs to user {other.name!r}")
        if thumb not in record.certificates:
            record.certificates.append(thumb)
    users[name] = record
    save_users(path, users)
    return record


def cli_users_add(args) -> int:
    if not NAME_RE.match(args.name) or args.name == "anonymous":
        raise CliError(f"bad user name {args.name!r}: letters, digits, '.', '_', '@', '-'; at most 64; "
                       "not 'anonymous'")
    if not args.password_stdin and not args.certificate:
        raise CliError("give --password-stdin (password on standard input) and/or --certificate FILE")
    thumbprint = None
    if args.certificate:
        try:
            thumbprint = thumbprint_of(load_certificate_file(Path(args.certificate)))
        except (OSError, ValueError) as exc:
            raise CliError(f"{args.certificate}: not a certificate: {exc}") from None
    password = _read_password_stdin() if args.password_stdin else None
    data_dir = _data_dir(args)
    try:
        record = set_user(data_dir, args.name, args.role, password=password, certificate_thumbprint=thumbprint)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    what = ", ".join(x for x in ("password" if record.password else "",
                                 f"{len(record.certificates)} certificate(s)" if record.certificates else "") if x)
    print(f"user {record.name}: role {record.role} ({what}) in {users_path(data_dir)}")
    return 0


def cli_users_remove(args) -> int:
    path = users_path(_data_dir(args))
    users = _load_for_cli(path)
    if args.name not in users:
        raise CliError(f"no user {args.name!r} in {path}")
    del users[args.name]
    save_users(path, users)
    print(f"user {args.name} removed")
    return 0


def cli_users_list(args) -> int:
    path = users_path(_data_dir(args))
    users = _load_for_cli(path)
    if not users:
        print(f"no users in {path} (anonymous clients are Viewers unless the site switches them off)")
        return 0
    for name in sorted(users):
        u = users[name]
        login = []
        if u.password:
            login.append("password")
        login += [f"x509:{t}" for t in u.certificates]
        print(f"{name}\t{u.role}\t{' '.join(login)}")
    return 0
