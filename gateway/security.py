"""OPC UA security of the gateway: endpoints, certificates, trust list, logins, per-user access.

What asyncua gives and what this module adds (docs/interface.md section 4; certs/README.md):

- Endpoints: asyncua's `set_security_policy` with Basic256Sha256, Aes128_Sha256_RsaOaep and
  Aes256_Sha256_RsaPss, Sign and SignAndEncrypt; None only when the site allows it. asyncua
  still opens a None *channel* (for GetEndpoints) and, when no None endpoint exists, checks
  nothing on it: `_process_message` below refuses every service but discovery on such a channel.
- Application-instance certificate: made with asyncua's `cert_gen` into `<data-dir>/pki/own/`
  (gateway/pki.py, with the trust list and `cmcs certs`).
- Client certificates: asyncua validates only the certificate a client *puts in* CreateSession,
  not the one that secured the channel. We check the channel's certificate when the channel is
  opened (OpenSecureChannel): trusted list `pki/trusted/` through asyncua's `TrustStore`
  (re-read whenever that folder changes, so `cmcs certs trust` needs no restart), refused with an
  ERR message and a copy in `pki/rejected/` otherwise. CreateSession then runs asyncua's
  `CertificateValidator` (time range, ApplicationUri in the SubjectAltName).
- Users: `gateway.users.GatewayUserManager` (asyncua's `UserManager` hook); failed logins are
  counted per client address and the next ActivateSession from that address waits
  (exponential, bounded), one at a time.
- Per-user access: every session is asyncua role `User`; our role decides. The UserAccessLevel
  and UserExecutable a client reads are rewritten per session (asyncua's PostRead callback);
  writes go through `RoleAwareAttributeService` (only the CMCS setpoints, Engineer and up).
  Every role check of the gateway (command service, CMCS and alarm methods, writes) is
  `AccessPolicy.allows` / `AccessPolicy.may_call`, with ROLE_RANK and REQUIRED_ROLE below.

asyncua has no hook for the checks on the connection (OpenSecureChannel, the None channel,
ActivateSession): gateway/asyncua_hooks.py patches its UaProcessor to call
`SecurityState.check_open` and `SecurityState.process_message` of a server secured here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.address_space import AttributeService
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import asyncua_hooks
# the PKI helpers moved to gateway.pki; these names stay importable from here
from gateway.pki import (CERT_DAYS, RSA_KEY_BITS, ClientCertificates, Pki, application_uri,  # noqa: F401
                         cert_file_name, create_server_certificate, der, ensure_server_certificate, host_names,
                         leaf_of_chain, load_certificate_bytes, load_certificate_file, san_dns, san_uris,
                         thumbprint_of, write_private)
from gateway.session import CURRENT_PROCESSOR, session_role_of  # noqa: F401  (session_role_of: re-exported)
from gateway.users import (PEER, ROLES, TOKEN_KIND, GatewayUser, GatewayUserManager, load_users, session_role,
                           set_user, users_path)

log = logging.getLogger(__name__)

SC = ua.StatusCodes
SECURE_POLICIES = (
    ua.SecurityPolicyType.Basic256Sha256_Sign,
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
)
SECURE_POLICY_URIS = frozenset({
    "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256",
    "http://opcfoundation.org/UA/SecurityPolicy#Aes128_Sha256_RsaOaep",
    "http://opcfoundation.org/UA/SecurityPolicy#Aes256_Sha256_RsaPss",
})
# Services a None channel may carry when the site does not allow the None endpoint (Part 4 5.4)
_DISCOVERY = frozenset({ua.NodeId(ua.ObjectIds.GetEndpointsRequest_Encoding_DefaultBinary),
                        ua.NodeId(ua.ObjectIds.FindServersRequest_Encoding_DefaultBinary),
                        ua.NodeId(ua.ObjectIds.CloseSecureChannelRequest_Encoding_DefaultBinary)})
_REGISTER = frozenset({ua.NodeId(ua.ObjectIds.RegisterServerRequest_Encoding_DefaultBinary),
                       ua.NodeId(ua.ObjectIds.RegisterServer2Request_Encoding_DefaultBinary)})
_CREATE_SESSION = ua.NodeId(ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary)
_ACTIVATE_SESSION = ua.NodeId(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary)

# AccessLevel bits that let a client change something (Part 3 5.6.2); CurrentRead, HistoryRead
# and SemanticChange stay as stored.
_WRITE_BITS = (ua.AccessLevel.CurrentWrite.mask | ua.AccessLevel.HistoryWrite.mask
               | ua.AccessLevel.StatusWrite.mask | ua.AccessLevel.TimestampWrite.mask)

# Who may do what (docs/interface.md section 4): a role may do what any role below it may. Every role
# check of the gateway goes through AccessPolicy.allows with these.
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}  # Viewer 0 < Operator 1 < Engineer 2 < Admin 3
REQUIRED_ROLE = {"SwitchSource": "Operator", "SetPreferredSource": "Operator", "StartBridging": "Operator",
                 "StopBridging": "Operator", "SetMode": "Engineer", "Write": "Engineer",
                 "ReportPrediction": "Engineer", "ClearPrediction": "Engineer", "Advise": "Engineer",
                 "ReportLossOfRedundancy": "Engineer", "ClearLossOfRedundancy": "Engineer"}


CMCS_USER = "cmcs"  # the built-in CMCS's OPC UA user (role Engineer, X509 token)


def cmcs_client_uri() -> str:
    return f"urn:cmcs-gateway:{socket.gethostname()}:cmcs-client"


def ensure_cmcs_client(data_dir: Path, days: int = CERT_DAYS) -> tuple[Path, Path, str]:
    """The built-in CMCS's own identity, created on first start: `<data-dir>/cmcs/cert.der` and
    `key.pem` (0600), the certificate trusted in pki/trusted/ and mapped to the user `cmcs` with the
    Engineer role (X509 user token; no password anywhere). Returns (cert, key, ApplicationUri)."""
    pki = Pki.of(data_dir).ensure()
    folder = Path(data_dir) / "cmcs"
    folder.mkdir(exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    cert_file, key_file, uri = folder / "cert.der", folder / "key.pem", cmcs_client_uri()
    cert = None
    if cert_file.exists() and key_file.exists():
        cert = load_certificate_file(cert_file)
        if cert.not_valid_after_utc <= datetime.now(timezone.utc) or uri not in san_uris(cert):
            cert = None
    if cert is None:
        key = cert_gen.generate_private_key()
        cert = cert_gen.generate_self_signed_app_certificate(
            key, f"cmcs-client@{socket.gethostname()}", {"organizationName": "cmcs-gateway"},
            [x509.UniformResourceIdentifier(uri)] + [x509.DNSName(n) for n in host_names()],
            [ExtendedKeyUsageOID.CLIENT_AUTH], days=days)
        write_private(key_file, cert_gen.dump_private_key_as_pem(key), 0o600)
        write_private(cert_file, der(cert), 0o644)
        log.info("new certificate for the built-in CMCS %s (SHA-1 %s)", cert_file, thumbprint_of(cert))
    trusted = pki.trusted / cert_file_name(cert)
    if not trusted.exists():
        write_private(trusted, der(cert), 0o644)
    record = load_users(users_path(data_dir)).get(CMCS_USER)
    if record is None or record.role != "Engineer" or thumbprint_of(cert) not in record.certificates:
        set_user(data_dir, CMCS_USER, "Engineer", certificate_thumbprint=thumbprint_of(cert))
    return cert_file, key_file, uri


# ---- failed logins -----------------------------------------------------------------------------------
@dataclass
class _PeerRecord:
    failures: int = 0
    last_failure: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LoginThrottle:
    """Per client address: after n failed logins in a row the next attempt waits
    min(base * 2^(n-1), max) seconds; attempts from one address run one at a time; a success
    or `forget_after_s` without failure clears the count."""

    def __init__(self, base_delay_s: float = 0.5, max_delay_s: float = 15.0, forget_after_s: float = 900.0,
                 clock: Callable[[], float] = time.monotonic):
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.forget_after_s = forget_after_s
        self.clock = clock
        self._peers: dict[str, _PeerRecord] = {}

    def _record(self, peer: str) -> _PeerRecord:
        rec = self._peers.get(peer)
        if rec is None:
            if len(self._peers) > 10_000:  # bounded memory under a scan from many addresses
                self._expire()
            rec = self._peers[peer] = _PeerRecord()
        elif rec.failures and self.clock() - rec.last_failure > self.forget_after_s:
            rec.failures = 0
        return rec

    def _expire(self) -> None:
        now = self.clock()
        for peer in [p for p, r in self._peers.items()
                     if now - r.last_failure > self.forget_after_s and not r.lock.locked()]:
            del self._peers[peer]

    def delay_s(self, peer: str) -> float:
        rec = self._record(peer)
        if rec.failures == 0:
            return 0.0
        return min(self.base_delay_s * 2 ** (rec.failures - 1), self.max_delay_s)

    def failures(self, peer: str) -> int:
        return self._record(peer).failures

    def lock(self, peer: str) -> asyncio.Lock:
        return self._record(peer).lock

    def failed(self, peer: str) -> int:
        rec = self._record(peer)
        rec.failures += 1
        rec.last_failure = self.clock()
        return rec.failures

    def succeeded(self, peer: str) -> None:
        self._record(peer).failures = 0


# ---- per-user access --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Writable:
    """A variable a client may write: who, and which values."""

    point: tuple[str, str]  # (device, point) in the site model; device "*": that point of every device
    min_role: str
    low: float
    high: float
    integer: bool = False
    text: bool = False  # a String of at most `high` characters
    audit: bool = True  # audited (a setpoint); False for the CMCS's results, written every cycle


# Cmcs setpoints: docs/interface.md section 4 "Engineer (+ SetMode, writable setpoints such as RiskThreshold)"
WRITABLE_POINTS = (
    Writable(("Cmcs", "RiskThreshold"), "Engineer", 0.0, 1.0),
    Writable(("Cmcs", "Mode"), "Engineer", 0, 2, integer=True),  # CmcsMode 0 Manual .. 2 Automatic
    # the CMCS's results, written back by the CMCS client (role Engineer) every cycle: not control
    # actions, so not audited (its method calls are)
    Writable(("*", "RiskScore"), "Engineer", 0.0, 1.0, audit=False),
    Writable(("*", "PredictedLoad"), "Engineer", 0.0, 10000.0, audit=False),
    Writable(("Cmcs", "CycleTime"), "Engineer", 0.0, 1e7, audit=False),
    Writable(("Cmcs", "ActiveMitigations"), "Engineer", 0, 2**32 - 1, integer=True, audit=False),
    Writable(("Cmcs", "ModelVersion"), "Engineer", 0, 128, text=True, audit=False),
)

_USER_ATTRIBUTES = frozenset({ua.AttributeIds.UserAccessLevel, ua.AttributeIds.UserExecutable,
                              ua.AttributeIds.UserWriteMask})
_SERVER_USER = User(role=UserRole.Admin)  # asyncua's default for AttributeService.write
# on_write(user, role, (device, point), value, status, old_value): every client write of a setpoint
WriteListener = Callable[[str, str, tuple[str, str], Any, int, Any], Awaitable[None] | None]


class AccessPolicy:
    """What each role may write and call, and the UserAccessLevel/UserExecutable that follow."""

    def __init__(self, writables: dict[ua.NodeId, Writable], method_roles: dict[ua.NodeId, str]):
        self.writables = writables
        self.method_roles = method_roles

    def require(self, method_id: ua.NodeId, role: str) -> None:
        """Make `UserExecutable` of a method node follow `role` (for methods checked elsewhere,
        e.g. the alarms' Acknowledge)."""
        self.method_roles[method_id] = role

    @staticmethod
    def allows(role: str, required: str) -> bool:
        """`role` may do what needs `required`: the one role check of the gateway (command service,
        CMCS methods, alarm methods, writes, UserAccessLevel/UserExecutable). An unknown role may do nothing."""
        return ROLE_RANK.get(role, -1) >= ROLE_RANK[required]

    @classmethod
    def may_call(cls, role: str, method: str) -> bool:
        """`role` may call the gateway method `method` (REQUIRED_ROLE: SwitchSource, SetMode, ...)."""
        return cls.allows(role, REQUIRED_ROLE[method])

    def user_access_level(self, role: str, nodeid: ua.NodeId, stored: int) -> int:
        rule = self.writables.get(nodeid)
        if rule is not None and self.allows(role, rule.min_role):
            return stored
        return stored & ~_WRITE_BITS & 0xFF

    def user_executable(self, role: str, nodeid: ua.NodeId, stored: bool) -> bool:
        required = self.method_roles.get(nodeid)
        if required is None:
            return stored
        return bool(stored) and self.allows(role, required)

    def on_post_read(self, event, _dispatcher=None) -> None:
        """asyncua PostRead callback: the session's own UserAccessLevel / UserExecutable (and a
        UserWriteMask of 0: no client may write attributes other than Value)."""
        user = event.user
        if not event.is_external or event.response_params is None:
            return
        _name, role = session_role(user)
        results = event.response_params
        for i, rv in enumerate(event.request_params.NodesToRead):
            attr = rv.AttributeId
            if attr not in _USER_ATTRIBUTES:
                continue
            dv = results[i]
            if (dv.StatusCode is not None and not dv.StatusCode.is_good()) or dv.Value is None:
                continue
            if attr == ua.AttributeIds.UserAccessLevel:
                value = ua.Variant(self.user_access_level(role, rv.NodeId, int(dv.Value.Value or 0)),
                                   ua.VariantType.Byte)
            elif attr == ua.AttributeIds.UserWriteMask:
                value = ua.Variant(0, ua.VariantType.UInt32)
            else:
                value = ua.Variant(self.user_executable(role, rv.NodeId, bool(dv.Value.Value)),
                                   ua.VariantType.Boolean)
            # a new DataValue: the stored one is shared by every session
            results[i] = ua.DataValue(value, StatusCode=dv.StatusCode, SourceTimestamp=dv.SourceTimestamp,
                                      ServerTimestamp=dv.ServerTimestamp)


class RoleAwareAttributeService(AttributeService):
    """asyncua's AttributeService, with writes by client sessions decided by role: only the
    `Writable` variables, Engineer and up, values in range; status and timestamps are the server's."""

    def __init__(self, aspace, policy: AccessPolicy, on_write: WriteListener | None = None):
        super().__init__(aspace)
        self.policy = policy
        self.on_write = on_write

    async def write(self, params: ua.WriteParameters, user: User = _SERVER_USER) -> list[ua.StatusCode]:
        if not isinstance(user, GatewayUser) and user.role is UserRole.Admin:
            return await super().write(params, user)  # the server's own internal session
        return [await self._write_one(wv, user) for wv in params.NodesToWrite]

    async def _write_one(self, wv: ua.WriteValue, user) -> ua.StatusCode:
        name, role = session_role(user)
        rule = self.policy.writables.get(wv.NodeId)
        value = wv.Value.Value.Value if wv.Value is not None and wv.Value.Value is not None else None
        old_value = None
        if wv.NodeId not in self._aspace:
            status = SC.BadNodeIdUnknown
        elif rule is None or wv.AttributeId != ua.AttributeIds.Value:
            status = SC.BadNotWritable  # no other variable, and no other attribute (WriteMask 0)
        elif not self.policy.allows(role, rule.min_role):
            status = SC.BadUserAccessDenied
        elif wv.IndexRange:
            status = SC.BadWriteNotSupported
        else:
            status = self._check_value(rule, wv.Value.Value if wv.Value is not None else None)
            if status == SC.Good:
                variant = wv.Value.Value
                dv = ua.DataValue(variant, SourceTimestamp=datetime.now(timezone.utc))
                old_value = self._aspace.read_attribute_value(wv.NodeId, ua.AttributeIds.Value).Value.Value
                clean = ua.WriteValue(NodeId=wv.NodeId, AttributeId=wv.AttributeId, Value=dv)
                status = (await super().write(ua.WriteParameters(NodesToWrite=[clean]), user))[0].value
        if status != SC.Good:
            log.warning("write refused: %s (%s) on %s: %s", name, role, wv.NodeId.to_string(),
                        ua.StatusCode(status).name)
        if rule is not None and self.on_write is not None and (rule.audit or status != SC.Good):
            r = self.on_write(name, role, rule.point, value, status, old_value)
            if asyncio.iscoroutine(r):
                await r
        return ua.StatusCode(status)

    @staticmethod
    def _check_value(rule: Writable, variant: ua.Variant | None) -> int:
        if variant is None or variant.Value is None or isinstance(variant.Value, list | bool):
            return SC.BadTypeMismatch
        v = variant.Value
        if rule.text:
            if not isinstance(v, str):
                return SC.BadTypeMismatch
            return SC.Good if len(v) <= rule.high else SC.BadOutOfRange
        if not isinstance(v, int | float):
            return SC.BadTypeMismatch
        if rule.integer and (not isinstance(v, int) or v not in range(int(rule.low), int(rule.high) + 1)):
            return SC.BadOutOfRange
        if not rule.low <= v <= rule.high:  # False for NaN too
            return SC.BadOutOfRange
        return SC.Good


# ---- the connection checks (called by gateway.asyncua_hooks) ----------------------------------------------------------------
@dataclass
class SecurityState:
    """What the connection hooks need, hung on asyncua's InternalServer as `cmcs_security`."""

    allow_none: bool
    certificates: ClientCertificates
    throttle: LoginThrottle
    users: GatewayUserManager
    policy_uris: frozenset[str]
    server_cert: x509.Certificate
    pki: Pki
    policy: AccessPolicy | None = None
    endpoints: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"server certificate {self.pki.cert_file} (SHA-1 {thumbprint_of(self.server_cert)}); "
                f"endpoints: {', '.join(self.endpoints)}")

    # what gateway.asyncua_hooks calls on the connection of a server that has this state
    async def check_open(self, processor, header, body) -> tuple[int, str] | None:
        """OpenSecureChannel: None to let asyncua go on, or (StatusCode, reason) to refuse the channel."""
        return await _check_open(self, processor, header, body)

    async def process_message(self, processor, original, typeid, requesthdr, seqhdr, body):
        """A request on an open channel; `original` is asyncua's own UaProcessor._process_message."""
        return await _process_message(self, processor, original, typeid, requesthdr, seqhdr, body)


def _peer_host(processor) -> str:
    name = processor.name
    if isinstance(name, tuple) and name:
        return str(name[0])
    return str(name)


async def _check_open(sec: SecurityState, processor, header, body) -> tuple[int, str] | None:
    """Refuse an OpenSecureChannel for an unknown policy or with an untrusted certificate."""
    try:
        data = body.copy(header.body_size)
        algo = struct_from_binary(ua.AsymmetricAlgorithmHeader, data)
    except Exception:  # noqa: BLE001 - asyncua reports malformed messages itself
        return None
    peer = _peer_host(processor)
    uri = algo.SecurityPolicyURI
    if uri == SecurityPolicyNone.URI:
        return None  # discovery always; sessions only if allowed (see _process_message)
    if uri not in sec.policy_uris:
        log.warning("refused a secure channel from %s: policy %s is not offered", peer, uri)
        return SC.BadSecurityPolicyRejected, f"security policy {uri} is not offered"
    try:
        leaf = leaf_of_chain(algo.SenderCertificate or b"")
    except ValueError:
        return SC.BadCertificateInvalid, "no client certificate"
    status = await sec.certificates.check(leaf)
    if status != SC.Good:
        log.warning("refused a secure channel from %s: %s", peer, ua.StatusCode(status).name)
        return status, "the client certificate is not trusted by this server: see pki/rejected/"
    return None


async def _process_message(sec: SecurityState, processor, original, typeid, requesthdr, seqhdr, body):
    """Every request after the channel is open: no discovery-server services, nothing but discovery
    on a None channel the site does not allow, the channel certificate kept with the session it
    creates, and ActivateSession through the login throttle."""
    peer = _peer_host(processor)
    peer_token = PEER.set(peer)
    try:
        if typeid in _REGISTER:
            raise ServiceError(SC.BadServiceUnsupported)  # we are not a discovery server
        if processor._connection.security_policy.URI == SecurityPolicyNone.URI and not sec.allow_none \
                and typeid not in _DISCOVERY:
            log.warning("refused a request on an unsecured channel from %s (SecurityPolicy None is off)", peer)
            raise ServiceError(SC.BadSecurityPolicyRejected)
        if typeid == _CREATE_SESSION:
            result = await original(processor, typeid, requesthdr, seqhdr, body)
            if processor.session is not None:  # the certificate its ActivateSessions must come with
                processor.session.cmcs_channel_certificate = processor._connection.security_policy.peer_certificate
            return result
        if typeid != _ACTIVATE_SESSION:
            return await original(processor, typeid, requesthdr, seqhdr, body)
        return await _activate(sec, processor, peer, original, typeid, requesthdr, seqhdr, body)
    finally:
        PEER.reset(peer_token)


def _token_kind(body) -> str:
    try:
        params = struct_from_binary(ua.ActivateSessionParameters, body.copy())
    except Exception:  # noqa: BLE001 - asyncua will refuse the request itself
        return "invalid"
    token = params.UserIdentityToken
    if isinstance(token, ua.UserNameIdentityToken):
        return "username"
    if isinstance(token, ua.X509IdentityToken):
        return "x509"
    if isinstance(token, ua.AnonymousIdentityToken) or (isinstance(token, ua.ExtensionObject)
                                                        and token.TypeId == ua.NodeId(ua.ObjectIds.Null)):
        return "anonymous"
    return "unsupported"


async def _activate(sec: SecurityState, processor, peer: str, original, typeid, requesthdr, seqhdr,
                    body):
    throttle = sec.throttle
    kind = _token_kind(body)
    async with throttle.lock(peer):  # one login at a time per address
        delay = throttle.delay_s(peer)
        if delay:
            await asyncio.sleep(delay)
        kind_token = TOKEN_KIND.set(kind)
        try:
            # a session moved to another channel must come with the certificate it was created with
            # (Part 4 5.6.3): asyncua looks it up by its token alone
            session = processor.session or processor.iserver.lookup_external_session(requesthdr.AuthenticationToken)
            if session is not None and getattr(session, "cmcs_channel_certificate", None) \
                    != processor._connection.security_policy.peer_certificate:
                raise ServiceError(SC.BadSecurityChecksFailed)
            result = await original(processor, typeid, requesthdr, seqhdr, body)
        except Exception as exc:
            n = throttle.failed(peer)
            code = getattr(exc, "code", None)
            log.warning("login refused from %s (%s token): %s; %d failure(s) in a row, the next attempt waits %.1f s",
                        peer, kind, ua.StatusCode(code).name if code is not None else type(exc).__name__, n,
                        throttle.delay_s(peer))
            raise
        finally:
            TOKEN_KIND.reset(kind_token)
    session = processor.session
    if session is not None and session.is_activated():
        throttle.succeeded(peer)
        name, role = session_role(session.user)
        log.info("login: %s (%s, %s token) from %s over %s", name, role, kind, peer,
                 processor._connection.security_policy.URI.rsplit("#", 1)[-1])
    return result


async def _validate_session_certificate(cert: x509.Certificate, description: ua.ApplicationDescription) -> None:
    """asyncua certificate_validator (CreateSession): same certificate as the channel, valid dates,
    the client's ApplicationUri in its SubjectAltName. Ignored on a None channel (Part 4 5.6.2)."""
    processor = CURRENT_PROCESSOR.get()
    if processor is not None:
        policy = processor._connection.security_policy
        if policy.URI == SecurityPolicyNone.URI:
            return
        if policy.peer_certificate and der(cert) != policy.peer_certificate:
            raise ServiceError(SC.BadCertificateInvalid)
    await CertificateValidator(CertificateValidatorOptions.TIME_RANGE | CertificateValidatorOptions.URI).validate(
        cert, description)


# ---- the one call from gateway.server ---------------------------------------------------------------
async def secure_server(server: Server, opcua, data_dir: Path, model=None,
                        on_write: WriteListener | None = None) -> SecurityState:
    """Endpoints, certificate, trust list, users and per-user access on an asyncua Server that is
    initialised (ApplicationUri set) but not started. `opcua` is the site's OpcUaConfig; `model`
    the SiteModel (for the writable setpoints and the methods' roles)."""
    asyncua_hooks.install()  # the connection hooks call SecurityState.check_open / process_message
    pki = Pki.of(data_dir).ensure()
    cert = ensure_server_certificate(pki, server.get_application_uri())
    await server.load_certificate(str(pki.cert_file))
    await server.load_private_key(str(pki.key_file))
    policies = list(SECURE_POLICIES)
    if opcua.allow_security_none:
        policies.insert(0, ua.SecurityPolicyType.NoSecurity)
        log.warning("OPC UA SecurityPolicy None is on (site file: gateway.opcua.allow_security_none)")
    server.set_security_policy(policies)  # asyncua's SimpleRoleRuleset: role User, no node management
    tokens = [ua.UserNameIdentityToken, ua.X509IdentityToken]
    if opcua.allow_anonymous:
        tokens.insert(0, ua.AnonymousIdentityToken)
    server.set_identity_tokens(tokens)
    server.allow_remote_admin(False)
    users = GatewayUserManager(users_path(data_dir), allow_anonymous=opcua.allow_anonymous)
    server.iserver.set_user_manager(users)
    server.set_certificate_validator(_validate_session_certificate)
    certificates = ClientCertificates(pki)
    await certificates.reload_if_changed()
    state = SecurityState(allow_none=opcua.allow_security_none, certificates=certificates, throttle=LoginThrottle(),
                          users=users, policy_uris=SECURE_POLICY_URIS, server_cert=cert, pki=pki)
    state.endpoints = [p.name for p in policies]
    # without a model nothing is writable (asyncua alone would let any User write CurrentWrite nodes)
    state.policy = await _install_access_policy(server, model, on_write)
    server.iserver.cmcs_security = state  # type: ignore[attr-defined]
    server.iserver.method_service.cmcs_security = state  # type: ignore[attr-defined]  (asyncua_hooks 5.)
    return state


async def _install_access_policy(server: Server, model, on_write: WriteListener | None) -> AccessPolicy:
    aspace = server.iserver.aspace
    policy = AccessPolicy({}, {})
    if model is not None:  # without a model nothing is writable
        await extend_access_policy(server, policy, model)
    server.iserver.callback_service.addListener(CallbackType.PostRead, policy.on_post_read, priority=-7331)
    server.iserver.attribute_service = RoleAwareAttributeService(aspace, policy, on_write)
    return policy


async def extend_access_policy(server: Server, policy: AccessPolicy, model) -> None:
    """The writable setpoints and the methods' roles of `model`'s nodes (the whole site at start, or
    the SiteModel of what a site reload added)."""
    aspace = server.iserver.aspace
    targets: list[tuple[ua.NodeId, Writable]] = []
    for rule in WRITABLE_POINTS:
        if rule.point[0] == "*":
            targets += [(nid, replace(rule, point=key)) for key, nid in model.points.items() if key[1] == rule.point[1]]
        elif (nodeid := model.points.get(rule.point)) is not None:
            targets.append((nodeid, rule))
    for nodeid, rule in targets:
        policy.writables[nodeid] = rule
        # asyncua's own check (role User) needs CurrentWrite in AccessLevel and UserAccessLevel
        for attr in (ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel):
            level = aspace.read_attribute_value(nodeid, attr).Value.Value or 0
            await server.write_attribute_value(
                nodeid, ua.DataValue(ua.Variant(level | ua.AccessLevel.CurrentWrite.mask, ua.VariantType.Byte)), attr)
    policy.method_roles.update({info.method_id: REQUIRED_ROLE[method] for (_device, method), info in model.methods.items()
                                if method in REQUIRED_ROLE})


def shrink_access_policy(policy: AccessPolicy, nodeids: set) -> None:
    """Forget the rules of nodes a site reload deleted."""
    for table in (policy.writables, policy.method_roles):
        for nodeid in [n for n in table if n in nodeids]:
            del table[nodeid]
