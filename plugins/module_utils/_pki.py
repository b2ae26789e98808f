# Copyright: drguard maintainers
# Apache License 2.0
"""A drill's own PKI: one CA per drill, one short-lived leaf per tier, kept on a tmpfs only.

Trust domain ``<drill id>.drguard.internal``; tier identity
``spiffe://<drill id>.drguard.internal/tier/<tier>`` (docs/mtls.md).

- :func:`new_ca`: P-256, BasicConstraints cA pathLen 0 (critical), KeyUsage keyCertSign +
  cRLSign (critical), a critical NameConstraints extension permitting URIs of the trust domain
  only and excluding every DNS name and IP address; valid for the drill's TTL.
- :func:`issue_leaf`: P-256, an empty subject, exactly one URI SAN (critical, as RFC 5280
  wants with an empty subject), KeyUsage digitalSignature (critical), EKU serverAuth +
  clientAuth, BasicConstraints cA false (critical); 15 minutes by default.
- :func:`check_leaf`: our own verifier of a leaf against the trusted CAs (signature, validity,
  the profile above and the name constraint) - Python's ``ssl`` checks no URI SAN itself and
  ``cryptography``'s verifier refuses URI name constraints as unsupported.
- :class:`Store`: the drill's PKI directory on a tmpfs (0700, files 0600): CA keys, one
  ``tier-<tier>.pem`` (leaf chain and key in one file, so a reader never sees a new certificate
  with an old key), ``trust.pem`` (trusted CA certificates and their CRLs) and ``state.json``
  (serials, fingerprints, expiry: never key material). :func:`destroy` overwrites and unlinks.

Private keys are never returned by anything a module result is built from (:func:`describe`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import stat
import tempfile

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.oid import NameOID
    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - the module reports it
    HAS_CRYPTOGRAPHY = False

from ansible_collections.drguard.sandbox.plugins.module_utils import _io
from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets
from ansible_collections.drguard.sandbox.plugins.module_utils import drill

TRUST_SUFFIX = ".drguard.internal"
DEFAULT_LEAF_LIFETIME = 900  # seconds: 15 minutes
MIN_LEAF_LIFETIME = 20  # seconds; short leaves make renewal testable (docs/mtls.md, "Renewal")
MIN_CA_LEFT = 60  # seconds a CA must still be valid (and a CA's TTL at least)
BACKDATE = 60  # seconds before now a certificate becomes valid (clock skew between namespaces: none, but cheap)
TIER_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
VALIDATION_TIER = "validation"
STATE_FILE = "state.json"
TRUST_FILE = "trust.pem"


class PkiError(Exception):
    """A PKI operation failed; ``msg`` is one sentence, ``detail`` the structured fields."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


def _now(now=None):
    return now if now is not None else datetime.datetime.now(datetime.timezone.utc)


def trust_domain(drill_id: str) -> str:
    """``<drill id>.drguard.internal``."""
    try:
        drill.validate_drill_id(drill_id)
    except drill.DrillError as exc:
        raise PkiError(str(exc), field="drill_id") from None
    return drill_id + TRUST_SUFFIX


def spiffe_id(drill_id: str, tier: str) -> str:
    """``spiffe://<drill id>.drguard.internal/tier/<tier>``."""
    if not isinstance(tier, str) or not TIER_RE.fullmatch(tier):
        raise PkiError("tier %r is not a valid tier name (lowercase letters, digits, hyphens); fix the tier list"
                       % (tier,), field="tier")
    return "spiffe://%s/tier/%s" % (trust_domain(drill_id), tier)


class CA:
    """A drill CA: its private key and certificate (the key never leaves the store)."""

    def __init__(self, key, cert):
        self.key = key
        self.cert = cert


class Leaf:
    """A tier's leaf: private key and certificate."""

    def __init__(self, tier, key, cert):
        self.tier = tier
        self.key = key
        self.cert = cert


def new_ca(drill_id: str, ttl: int, *, now=None) -> CA:
    """A new CA for ``drill_id`` valid for ``ttl`` seconds (the drill's TTL)."""
    domain = trust_domain(drill_id)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < MIN_CA_LEFT:
        raise PkiError("ttl %r must be the drill's TTL in seconds (at least %d); pass the drill's ttl"
                       % (ttl, MIN_CA_LEFT), field="ttl")
    now = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    # A subject of its own per CA: during a CA rotation two CAs are trusted at once, and OpenSSL finds
    # a CRL by its issuer's name (the same name twice would check one CA's CRL with the other's key).
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drguard"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, drill_id),
                      x509.NameAttribute(NameOID.COMMON_NAME, "drill CA %s" % secrets.token_hex(4))])
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(domain)],
        excluded_subtrees=[x509.DNSName(""), x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                           x509.IPAddress(ipaddress.ip_network("::/0"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=BACKDATE))
            .not_valid_after(now + datetime.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(constraints, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return CA(key, cert)


def issue_leaf(ca: CA, drill_id: str, tier: str, lifetime: int = DEFAULT_LEAF_LIFETIME, *, now=None) -> Leaf:
    """A leaf for ``tier`` signed by ``ca``, valid ``lifetime`` seconds, never past the CA."""
    uri = spiffe_id(drill_id, tier)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < MIN_LEAF_LIFETIME:
        raise PkiError("leaf lifetime %r must be at least %d seconds; pass a longer leaf_lifetime"
                       % (lifetime, MIN_LEAF_LIFETIME), field="leaf_lifetime")
    now = _now(now)
    not_after = min(now + datetime.timedelta(seconds=lifetime), ca.cert.not_valid_after_utc)
    if not_after - now < datetime.timedelta(seconds=min(lifetime, MIN_CA_LEFT)):
        raise PkiError("the drill's CA expires at %s, too soon for a new leaf; rotate the CA (state rotated, ca true)"
                       % ca.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"), field="ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=BACKDATE)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Leaf(tier, key, cert)


def renewal_time(cert):
    """When ``cert`` reaches half-life: half of its lifetime after its issue (``not_before`` is back-dated by
    :data:`BACKDATE`, which is no part of the lifetime), so a leaf of ``leaf_lifetime`` L is renewed L/2
    after it was issued."""
    start, end = cert.not_valid_before_utc + datetime.timedelta(seconds=BACKDATE), cert.not_valid_after_utc
    return start + max(end - start, datetime.timedelta(0)) / 2


def needs_renewal(cert, now=None) -> bool:
    """True from the half-life of ``cert`` on (:func:`renewal_time`)."""
    return _now(now) >= renewal_time(cert)


def serial_hex(cert) -> str:
    return "%X" % cert.serial_number


def fingerprint(cert) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def describe(cert) -> dict:
    """What a result may carry about ``cert``: serial, SHA-256, validity, its URI SAN (no key material)."""
    out = {"serial": serial_hex(cert), "sha256": fingerprint(cert),
           "not_before": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        if len(uris) == 1:
            out["spiffe_id"] = uris[0]
    except x509.ExtensionNotFound:
        pass
    return out


# ---------------------------------------------------------------- our verifier

def identity_problem(cert, drill_id: str):
    """``(tier, None)`` when ``cert``'s SAN is exactly one URI ``spiffe://<trust domain>/tier/<tier>``,
    else ``(None, reason)``; the reasons are those of docs/mtls.md ("Reasons")."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None, "san_not_one_uri"
    except ValueError:
        return None, "certificate_malformed"
    names = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        return None, "san_not_one_uri"
    return judge_uri(names[0].value, trust_domain(drill_id))


# The one judgement of an identity URI, run here and inside the mTLS programs (standard library only).
IDENTITY_SOURCE = r'''
import re as _re_id

_TIER_NAME = _re_id.compile(r"[a-z][a-z0-9-]{0,30}")


def judge_uri(uri, domain):
    """(tier, None) for spiffe://<domain>/tier/<tier>, else (None, reason)."""
    if "\x00" in uri:
        return None, "san_nul_byte"
    if not uri.startswith("spiffe://"):
        return None, "not_spiffe"
    host, _, path = uri[len("spiffe://"):].partition("/")
    if host != domain:
        return None, "outside_trust_domain"
    parts = path.split("/")
    if len(parts) != 2 or parts[0] != "tier" or not _TIER_NAME.fullmatch(parts[1]):
        return None, "bad_identity_path"
    return parts[1], None
'''
_IDENTITY = {}
exec(compile(IDENTITY_SOURCE, "<drguard identity>", "exec"), _IDENTITY)  # noqa: S102 - our own source text


def judge_uri(uri: str, domain: str):
    """``(tier, None)`` or ``(None, reason)`` for one URI SAN value, exactly as the mTLS programs judge it."""
    return _IDENTITY["judge_uri"](uri, domain)


def check_leaf(cert, ca_certs, drill_id: str, *, now=None, purpose="client"):
    """``(tier, None)`` when ``cert`` is a valid leaf of one of ``ca_certs`` for ``drill_id``, else
    ``(None, reason)``: signature, validity, cA false, KeyUsage digitalSignature, EKU for ``purpose``
    (``client`` or ``server``), exactly one URI SAN in the trust domain (the CA's name
    constraint, enforced here too: OpenSSL does, ``cryptography``'s verifier does not)."""
    now = _now(now)
    issuer = None
    for ca in ca_certs:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            continue
        issuer = ca
        break
    if issuer is None:
        return None, "unknown_ca"
    if now < cert.not_valid_before_utc:
        return None, "not_yet_valid"
    if now > cert.not_valid_after_utc or now > issuer.not_valid_after_utc:
        return None, "expired"
    ext = cert.extensions
    try:
        basic = ext.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            return None, "ca_certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usage = ext.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            return None, "wrong_key_usage"
    except x509.ExtensionNotFound:
        return None, "wrong_key_usage"
    wanted = ExtendedKeyUsageOID.CLIENT_AUTH if purpose == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    try:
        if wanted not in ext.get_extension_for_class(x509.ExtendedKeyUsage).value:
            return None, "wrong_purpose"
    except x509.ExtensionNotFound:
        return None, "wrong_purpose"
    tier, reason = identity_problem(cert, drill_id)
    if reason is None and not _within_constraints(cert, issuer):
        return None, "name_constraint_violation"
    return tier, reason


def _within_constraints(cert, issuer) -> bool:
    """RFC 5280 URI constraints of ``issuer`` as we issue them: the URI's host equals a permitted host."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return True
    permitted = [n.value for n in (constraints.permitted_subtrees or [])
                 if isinstance(n, x509.UniformResourceIdentifier)]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        host = uri.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        if permitted and host.lower() not in [p.lower() for p in permitted]:
            return False
    return True


# ---------------------------------------------------------------- serialisation

def cert_pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def crl_pem(ca: CA, revoked_serials, *, now=None) -> bytes:
    """A CRL of ``ca`` revoking ``revoked_serials`` (hex), valid until the CA expires."""
    now = _now(now)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - datetime.timedelta(seconds=BACKDATE)).next_update(ca.cert.not_valid_after_utc))
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def default_dir(drill_id: str) -> str:
    """``/dev/shm/drguard-<drill id>/pki``: beside the drill's tmpfs secret store."""
    return os.path.join(_secrets.default_tmpfs_dir(drill_id), "pki")


def _require_tmpfs(directory):
    try:
        _secrets.require_tmpfs(directory)
    except _secrets.SecretError as exc:
        raise PkiError("the PKI directory must be on a tmpfs: %s" % exc, field="dir") from None


def write_private(path: str, data: bytes, *, uid=None, gid=None) -> None:
    """``data`` to ``path`` atomically, 0600, owned by ``uid``/``gid`` when given (a tier's workload)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            if uid is not None and (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(handle.fileno(), uid, gid)
            handle.write(data)
            handle.flush()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def destroy(directory: str) -> bool:
    """Overwrite every file of ``directory`` with zeros, unlink it, remove the directory; True when it existed."""
    try:
        return _secrets.wipe_dir(directory)
    except (OSError, _secrets.SecretError) as exc:
        raise PkiError("cannot destroy the PKI directory %s: %s; remove it by hand" % (directory, exc),
                       dir=directory) from None


def _load_cert(path):
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificate(handle.read())


def _load_key(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return serialization.load_pem_private_key(handle.read(), None)


class Store:
    """A drill's PKI directory: ``state.json``, ``ca-<serial>.pem`` / ``.key``, ``tier-<tier>.pem``, ``trust.pem``.

    ``state.json``: ``drill_id``, ``cas`` (trusted CA serials, the issuing one last), ``leaves``
    (tier -> ``{serial, ca}``), ``superseded`` (leaves replaced but not yet revoked, same shape),
    ``revoked`` (CA serial -> revoked leaf serials), ``retiring`` (CA serials trusted for the
    overlap only). Every write is atomic, 0600, in a 0700 directory on a tmpfs.
    """

    def __init__(self, drill_id: str, directory: str | None = None, *, check_tmpfs=True):
        trust_domain(drill_id)
        self.drill_id = drill_id
        self.dir = os.path.abspath(directory or default_dir(drill_id))
        self.check_tmpfs = check_tmpfs

    # -------------------------------------------------------------- state
    def exists(self) -> bool:
        return os.path.lexists(os.path.join(self.dir, STATE_FILE))

    def state(self) -> dict:
        try:
            with open(os.path.join(self.dir, STATE_FILE), encoding="utf-8") as handle:
                state = json.load(handle)
        except FileNotFoundError:
            return {"drill_id": self.drill_id, "cas": [], "leaves": {}, "superseded": [], "revoked": {},
                    "retiring": []}
        except (OSError, ValueError) as exc:
            raise PkiError("cannot read %s: %s; destroy the PKI (state absent) and create it again"
                           % (os.path.join(self.dir, STATE_FILE), exc), dir=self.dir) from None
        if state.get("drill_id") != self.drill_id:
            raise PkiError("the PKI directory %s belongs to drill %r, not %r; use the drill's own directory"
                           % (self.dir, state.get("drill_id"), self.drill_id), dir=self.dir)
        return state

    def prepare(self) -> None:
        if self.check_tmpfs:
            _require_tmpfs(self.dir)
        try:
            _io.ensure_private_dir(self.dir, parents=True)
        except OSError as exc:
            raise PkiError("cannot use %s as the PKI directory: %s" % (self.dir, exc), dir=self.dir) from None

    def _save_state(self, state) -> None:
        _io.atomic_write_json(os.path.join(self.dir, STATE_FILE), state)

    def ca(self, serial: str) -> CA:
        base = os.path.join(self.dir, "ca-%s" % serial)
        return CA(_load_key(base + ".key"), _load_cert(base + ".pem"))

    def ca_cert(self, serial: str):
        return _load_cert(os.path.join(self.dir, "ca-%s.pem" % serial))

    def issuing_ca(self, state=None) -> CA:
        state = state or self.state()
        if not state["cas"]:
            raise PkiError("drill %s has no CA in %s; create it first (state present)" % (self.drill_id, self.dir),
                           dir=self.dir)
        return self.ca(state["cas"][-1])

    def leaf_cert(self, tier: str):
        with open(self.tier_file(tier), "rb") as handle:
            return x509.load_pem_x509_certificate(handle.read())

    def tier_file(self, tier: str) -> str:
        spiffe_id(self.drill_id, tier)
        return os.path.join(self.dir, "tier-%s.pem" % tier)  # a prefix of its own: a tier may be named "trust"

    def trust_file(self) -> str:
        return os.path.join(self.dir, TRUST_FILE)

    # -------------------------------------------------------------- writes
    def add_ca(self, state, ttl, *, now=None) -> CA:
        ca = new_ca(self.drill_id, ttl, now=now)
        serial = serial_hex(ca.cert)
        write_private(os.path.join(self.dir, "ca-%s.key" % serial), key_pem(ca.key))
        write_private(os.path.join(self.dir, "ca-%s.pem" % serial), cert_pem(ca.cert))
        state["cas"].append(serial)
        return ca

    def write_leaf(self, state, ca: CA, tier: str, lifetime: int, *, now=None) -> Leaf:
        leaf = issue_leaf(ca, self.drill_id, tier, lifetime, now=now)
        write_private(self.tier_file(tier), cert_pem(leaf.cert) + key_pem(leaf.key))
        old = state["leaves"].get(tier)
        if old:
            state["superseded"].append(old)
        state["leaves"][tier] = {"serial": serial_hex(leaf.cert), "ca": serial_hex(ca.cert)}
        return leaf

    def write_trust(self, state, *, now=None) -> None:
        """``trust.pem``: every trusted CA certificate and its CRL (revoked leaves of that CA)."""
        parts = []
        for serial in state["cas"]:
            ca = self.ca(serial)
            parts.append(cert_pem(ca.cert))
            parts.append(crl_pem(ca, state["revoked"].get(serial, []), now=now))
        write_private(self.trust_file(), b"".join(parts))

    def save(self, state) -> None:
        self._save_state(state)

    def deliver(self, tier: str, directory: str, *, uid=None, gid=None, parts=("trust", "identity")) -> dict:
        """Copy ``tier``'s identity (``identity.pem``) and ``trust.pem`` into ``directory`` (0700,
        files 0600, owned by ``uid``/``gid``: the tier's workload). Nothing of another tier, no CA key.

        ``trust`` is written before ``identity``: a reader never holds a leaf of a CA its trust
        lacks. A CA rotation delivers ``parts=("trust",)`` to every tier (and reloads) before
        any identity of the new CA (docs/mtls.md, "Rotation")."""
        if not parts or set(parts) - {"trust", "identity"}:
            raise PkiError("deliver parts %r must be trust and/or identity; fix the call" % (parts,), field="parts")
        if self.check_tmpfs:
            _require_tmpfs(directory)
        uid = os.geteuid() if uid is None else uid
        gid = os.getegid() if gid is None else gid
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(directory)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise PkiError("%s is not a directory; remove it or choose another delivery directory" % directory,
                           dir=directory)
        if info.st_uid not in (uid, os.geteuid()):
            raise PkiError("%s is owned by uid %d; use a directory of the tier's own" % (directory, info.st_uid),
                           dir=directory)
        os.chown(directory, uid, gid, follow_symlinks=False)
        os.chmod(directory, 0o700, follow_symlinks=False)
        paths = {"trust": os.path.join(directory, TRUST_FILE), "identity": os.path.join(directory, "identity.pem")}
        sources = {"trust": self.trust_file(), "identity": self.tier_file(tier)}
        changed = False
        for part in ("trust", "identity"):
            if part not in parts:
                continue
            with open(sources[part], "rb") as handle:
                data = handle.read()
            if _same_file(paths[part], data, uid, gid):
                continue
            write_private(paths[part], data, uid=uid, gid=gid)
            changed = True
        return dict(paths, changed=changed)

    # -------------------------------------------------------------- the life cycle
    def summary(self, state=None) -> dict:
        """What a result may carry: the issuing CA, the trusted CAs, each leaf, revoked serials."""
        state = state or self.state()
        cas = [describe(self.ca_cert(s)) for s in state["cas"]]
        leaves = {}
        for tier in sorted(state["leaves"]):
            entry = describe(self.leaf_cert(tier))
            leaves[tier] = entry
        return {"dir": self.dir, "trust_domain": trust_domain(self.drill_id), "ca": cas[-1] if cas else None,
                "trusted_cas": cas, "leaves": leaves, "superseded": [old["serial"] for old in state["superseded"]],
                "revoked": sorted(s for serials in state["revoked"].values() for s in serials)}

    def present(self, tiers, ttl, lifetime=DEFAULT_LEAF_LIFETIME, *, now=None, check_mode=False) -> list:
        """A CA and one valid leaf per tier (``validation`` always); leaves past half-life renewed.

        Returns the actions taken (or, in check mode, that would be taken)."""
        tiers = tier_list(tiers)
        if not check_mode:
            self.prepare()
        state = self.state()
        actions = []
        if not state["cas"]:
            actions.append("create CA")
            if check_mode:
                return actions + ["issue leaf %s" % t for t in tiers]
            ca = self.add_ca(state, ttl, now=now)
        else:
            ca = self.issuing_ca(state)
        for tier in tiers:
            current = state["leaves"].get(tier)
            if current is None:
                actions.append("issue leaf %s" % tier)
            elif needs_renewal(self.leaf_cert(tier), now) or self.leaf_cert(tier).issuer != ca.cert.subject:
                actions.append("renew leaf %s" % tier)
            else:
                continue
            if not check_mode:
                self.write_leaf(state, ca, tier, lifetime, now=now)
        if actions and not check_mode:
            self.write_trust(state, now=now)
            self.save(state)
        return actions

    def rotate(self, tiers, ttl, lifetime=DEFAULT_LEAF_LIFETIME, *, ca=False, now=None, check_mode=False) -> list:
        """Re-issue every leaf now (``ca``: from a new CA, trusted beside the old one: the overlap bundle).

        The replaced leaves stay trusted until :meth:`retire`, so live servers can be reloaded
        first and no handshake fails meanwhile."""
        tiers = tier_list(tiers)
        state = self.state()
        if not state["cas"]:
            raise PkiError("drill %s has no PKI in %s to rotate; create it first (state present)"
                           % (self.drill_id, self.dir), dir=self.dir)
        if not check_mode:
            self.prepare()
        actions = []
        issuer = None  # set below unless in check mode, where no leaf is written
        if ca:
            actions.append("create CA (overlap with %s)" % ", ".join(state["cas"]))
            if not check_mode:
                state["retiring"] = sorted(set(state["retiring"]) | set(state["cas"]))
                issuer = self.add_ca(state, ttl, now=now)
        elif not check_mode:
            issuer = self.issuing_ca(state)
        for tier in tiers:
            actions.append("re-issue leaf %s" % tier)
            if not check_mode:
                self.write_leaf(state, issuer, tier, lifetime, now=now)
        if not check_mode:
            self.write_trust(state, now=now)
            self.save(state)
        return actions

    def retire(self, *, now=None, check_mode=False) -> list:
        """End a rotation: superseded leaves revoked (each CA's CRL), CAs kept for the overlap only
        dropped from ``trust.pem`` and their keys destroyed."""
        state = self.state()
        actions = []
        retiring = [s for s in state["retiring"] if s in state["cas"]]
        keep = [s for s in state["cas"] if s not in retiring]
        if state["superseded"]:
            actions.append("revoke %d superseded leaves" % len(state["superseded"]))
        actions.extend("retire CA %s" % s for s in retiring)
        if not actions or check_mode:
            return actions
        self.prepare()
        for serial in keep:
            mine = [old["serial"] for old in state["superseded"] if old["ca"] == serial]
            state["revoked"][serial] = sorted(set(state["revoked"].get(serial, [])) | set(mine))
        state["superseded"] = []
        for serial in retiring:
            for suffix in (".key", ".pem"):
                path = os.path.join(self.dir, "ca-%s%s" % (serial, suffix))
                _wipe_file(path)
            state["revoked"].pop(serial, None)
        state["cas"], state["retiring"] = keep, []
        self.write_trust(state, now=now)
        self.save(state)
        return actions


def _same_file(path, data, uid, gid) -> bool:
    """True when ``path`` is a regular 0600 file of ``uid``/``gid`` holding exactly ``data``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if (not stat.S_ISREG(info.st_mode) or stat.S_IMODE(info.st_mode) != 0o600
                or (info.st_uid, info.st_gid) != (uid, gid)):
            return False
        return handle.read() == data


def _wipe_file(path):
    try:
        size = os.lstat(path).st_size
    except FileNotFoundError:
        return
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "wb") as handle:
        handle.write(b"\0" * size)
        handle.flush()
        os.fsync(handle.fileno())
    os.unlink(path)


def tier_list(tiers) -> list:
    """``tiers`` in order, without duplicates, plus ``validation`` (always); each a valid tier name."""
    out = []
    for tier in list(tiers or []) + [VALIDATION_TIER]:
        if not isinstance(tier, str) or not TIER_RE.fullmatch(tier):
            raise PkiError("tier %r is not a valid tier name (lowercase letters, digits, hyphens); fix the tiers"
                           % (tier,), field="tiers")
        if tier not in out:
            out.append(tier)
    return out


def service_id(drill_id: str, name: str) -> str:
    """``spiffe://<drill id>.drguard.internal/<name>``: a drill service that is not a tier (``control-plane``,
    ``telemetry``); inside the CA's name constraint, and refused by every tier's authorisation (not ``/tier/``)."""
    if not isinstance(name, str) or not TIER_RE.fullmatch(name):
        raise PkiError("service name %r is not valid (lowercase letters, digits, hyphens); fix the call" % (name,),
                       field="name")
    return "spiffe://%s/%s" % (trust_domain(drill_id), name)


def issue_service_leaf(ca: CA, drill_id: str, name: str, lifetime: int, *, now=None) -> Leaf:
    """A leaf for the drill service ``name`` (:func:`service_id`), the profile of :func:`issue_leaf`: exactly one
    URI SAN, KeyUsage digitalSignature, EKU serverAuth + clientAuth, cA false; never past the CA."""
    uri = service_id(drill_id, name)
    template = issue_leaf(ca, drill_id, VALIDATION_TIER, lifetime, now=now)  # validity and profile checks
    cert = (x509.CertificateBuilder().subject_name(template.cert.subject).issuer_name(template.cert.issuer)
            .public_key(template.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(template.cert.not_valid_before_utc).not_valid_after(template.cert.not_valid_after_utc))
    for ext in template.cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
        cert = cert.add_extension(value, critical=ext.critical)
    return Leaf(name, template.key, cert.sign(ca.key, hashes.SHA256()))
