# Copyright: drguard maintainers
# Apache License 2.0
"""A drill's secrets: synthetic values, keyed masking, the tmpfs store, output redaction.

* Synthetic secrets are fresh random values (``secrets`` module), never derived from
  production.
* Masked secrets keep a production value's *shape* - its known prefix (``ghp_``,
  ``AKIA``, ``sk_live_``, ...), length, character classes and separators - while every
  other character comes from HMAC-SHA256 under a control-plane key, so formats still
  validate and nothing of the original is revealed. Deterministic per key.
* The tmpfs store keeps values in a 0700 directory of 0600 files on a tmpfs (never a
  disk); anything else fails closed.
* :class:`Secrets` is the backend of ``drill_secrets``: it puts a drill's secrets into
  Secrets Manager (with a drill KMS key) or the tmpfs store, and removes them. Every
  failure raises :class:`SecretError`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import string
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

try:
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError
except ImportError:  # pragma: no cover - AnsibleAWSModule reports missing botocore
    BotoCoreError = ClientError = None

from ansible_collections.amazon.aws.plugins.module_utils.exceptions import AnsibleAWSError
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict

from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import is_not_found
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import paginate
from ansible_collections.drguard.sandbox.plugins.module_utils._aws import retry_while
from ansible_collections.drguard.sandbox.plugins.module_utils._identity import policies_differ
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write
from ansible_collections.drguard.sandbox.plugins.module_utils._io import atomic_write_json
from ansible_collections.drguard.sandbox.plugins.module_utils._io import ensure_private_dir
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_DRILL_ID
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_EXPIRES_AT
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import TAG_MANAGED
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import DrillError
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import parse_time
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import validate_drill_id

MASK = "********"
# Where per-drill secret directories live. Predictable names are safe here: they are
# created 0700 with O_EXCL semantics (mkdir), checked with lstat (owner, type) and
# never followed through a symlink.
TMPFS_ROOT = "/dev/shm"  # noqa: S108
MIN_MASKING_KEY_CHARS = 16
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KINDS = ("synthetic_db", "synthetic_token", "masked")

# Public, non-secret prefixes that identify a credential's issuer and type. Longest
# first, so ``github_pat_`` wins over shorter ones.
KNOWN_PREFIXES = tuple(sorted((
    "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "gldt-", "glrt-",
    "AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA",
    "sk_live_", "sk_test_", "pk_live_", "pk_test_", "rk_live_", "rk_test_", "whsec_",
    "xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xapp-",
    "AIza", "ya29.", "SG.", "npm_", "pypi-", "hf_", "sk-proj-", "sk-ant-", "sk-",
    "dop_v1_", "doo_v1_", "shpat_", "shpss_",
), key=len, reverse=True))
# A generic leading ``word_`` / ``word-`` / ``word.`` counts as a non-secret prefix
# only in front of a long random-looking tail, so that short passwords such as
# ``summer-2024`` are masked entirely.
_GENERIC_PREFIX_RE = re.compile(r"^([A-Za-z][A-Za-z0-9]{1,11}[_.-])(.{16,})$", re.S)
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_HEX_UPPER_RE = re.compile(r"^[0-9A-F]+$")
_SEPARATORS = set("-_.:/+=@~ ")
_DOMAIN = b"drguard-mask-v1\x00"


class SecretError(AnsibleAWSError, ValueError):
    """Bad secret input, an unsafe store or a failed AWS call; the message says what and how to fix it.

    ``message`` is the one sentence for the user; ``exception`` is the boto error behind it,
    if any (``main()`` reports it through ``fail_json_aws``); ``kwargs`` are the structured
    fields of the failure (``actions`` done so far, ``kms_key_arn``, a command's output ...).
    """


# ---------------------------------------------------------------- synthetic values

def synthetic_password(length: int = 32) -> str:
    """A random password with upper, lower, digits and a few shell-safe symbols."""
    alphabet = string.ascii_letters + string.digits + "-_.~"
    while True:
        value = "".join(secrets.choice(alphabet) for _char in range(length))
        if (any(c.islower() for c in value) and any(c.isupper() for c in value)
                and any(c.isdigit() for c in value)):
            return value


def synthetic_db() -> str:
    """A synthetic database login as JSON ``{"username": ..., "password": ...}``."""
    user = "drguard_" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _char in range(10))
    return json.dumps({"username": user, "password": synthetic_password()}, sort_keys=True)


def synthetic_token() -> str:
    """A synthetic API token (256 bits, URL-safe)."""
    return "drg_" + secrets.token_urlsafe(32)


# ---------------------------------------------------------------- masking

def split_prefix(value: str) -> tuple:
    """``(prefix, rest)``: the non-secret leading prefix kept by :func:`mask`, and the rest."""
    for prefix in KNOWN_PREFIXES:
        if value.startswith(prefix) and len(value) > len(prefix):
            return prefix, value[len(prefix):]
    match = _GENERIC_PREFIX_RE.match(value)
    if match:
        return match.group(1), match.group(2)
    return "", value


def _stream(key: bytes, value: bytes, attempt: int):
    """An endless keyed byte stream: HMAC-SHA256(key, domain | attempt | counter | value)."""
    counter = 0
    while True:
        block = hmac.new(key, _DOMAIN + attempt.to_bytes(4, "big") + counter.to_bytes(8, "big") + value,
                         hashlib.sha256).digest()
        yield from block
        counter += 1


def _pick(stream, alphabet: str) -> str:
    # Rejection sampling keeps the choice uniform over the alphabet.
    limit = 256 - (256 % len(alphabet))
    while True:
        byte = next(stream)
        if byte < limit:
            return alphabet[byte % len(alphabet)]


def _alphabet_for(char: str, hex_lower: bool, hex_upper: bool) -> str | None:
    if hex_lower and char in "0123456789abcdef":
        return "0123456789abcdef"
    if hex_upper and char in "0123456789ABCDEF":
        return "0123456789ABCDEF"
    if char in string.ascii_lowercase:
        return string.ascii_lowercase
    if char in string.ascii_uppercase:
        return string.ascii_uppercase
    if char in string.digits:
        return string.digits
    if char in _SEPARATORS:
        return None
    # Any other character (symbols, non-ASCII) becomes a random symbol of a fixed set.
    return "!#%&*^"


def mask(value: str, key) -> str:
    """Mask ``value`` under ``key``: same prefix, length, classes and separators; nothing else kept.

    Raises :class:`SecretError` when the key is too short or nothing in ``value`` can
    be masked.
    """
    if isinstance(key, str):
        key = key.encode()
    if not key or len(key) < MIN_MASKING_KEY_CHARS:
        raise SecretError("masking_key must be at least %d characters" % MIN_MASKING_KEY_CHARS)
    if not isinstance(value, str) or not value:
        raise SecretError("a masked secret needs a non-empty value")
    prefix, rest = split_prefix(value)
    # Hex (digests, UUIDs) keeps to hex: all symbols hex, at least one digit and one letter.
    body = "".join(c for c in rest if c not in _SEPARATORS)
    looks_hex = len(body) >= 8 and any(c.isdigit() for c in body) and not body.isdigit()
    hex_lower = looks_hex and bool(_HEX_RE.match(body))
    hex_upper = looks_hex and bool(_HEX_UPPER_RE.match(body)) and not hex_lower
    classes = [_alphabet_for(c, hex_lower, hex_upper) for c in rest]
    if not any(classes):
        raise SecretError("the value has nothing to mask after its prefix %r" % prefix)
    for attempt in range(64):
        stream = _stream(key, value.encode("utf-8", "surrogatepass"), attempt)
        out = "".join(_pick(stream, alphabet) if alphabet else char
                      for char, alphabet in zip(rest, classes, strict=True))
        if out != rest:
            return prefix + out
    raise SecretError("the value is too short to be masked differently from itself")


def fingerprint(value: str, key) -> str:
    """A keyed, non-reversible fingerprint of a (masked or synthetic) value, for idempotence."""
    if isinstance(key, str):
        key = key.encode()
    digest = hmac.new(key or b"drguard-fingerprint", b"drguard-fp-v1\x00" + value.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------- redaction

# Between two symbols of a base64 or hex form: nothing, or a line break (real or JSON-escaped)
# with optional indentation - base64 -w76, PEM's 64 columns, xxd -p, a wrapped blob in JSON.
_WRAP = r"(?:(?:\r?\n|\\r\\n|\\n)[ \t]*)?"
# A base64 core shorter than this (a value of a few bytes) would match unrelated text.
_MIN_CORE = 6


def _string_values(value: str) -> set:
    """``value`` and, for a JSON object (synthetic_db), each of its string fields of 4+ characters."""
    values = {value} if value else set()
    with contextlib.suppress(ValueError, TypeError):
        parsed = json.loads(value)
        if isinstance(parsed, dict):
            values.update(v for v in parsed.values() if isinstance(v, str) and len(v) >= 4)
    return values


def base64_cores(raw: bytes, encoder=base64.b64encode) -> set:
    """The base64 symbols that encode only ``raw``, for each of the 3 byte alignments.

    Inside a longer base64 string (an HTTP Basic header ``user:password``, a JSON document),
    ``raw`` starts at an offset of 0, 1 or 2 bytes modulo 3; the symbols that mix its bits
    with its neighbours' differ, the ones in between are fixed. These cores are what
    :func:`redact` searches for, so the secret is found whatever surrounds it.
    """
    cores = set()
    for shift in range(3):
        encoded = encoder(b"\0" * shift + raw).decode().rstrip("=")
        # Leading symbols holding bits of the shift bytes, trailing one mixed with what follows.
        core = encoded[(0, 2, 3)[shift]:(shift + len(raw)) * 8 // 6]
        if len(core) >= _MIN_CORE:
            cores.add(core)
    return cores


def _encoded_forms(item: str) -> dict:
    """``{form: kind}`` for one string: kind ``text`` (exact), ``wrapped`` (line breaks allowed
    between symbols), ``hex`` (wrapped, any case) or ``url`` (any case)."""
    raw = item.encode("utf-8", "surrogatepass")
    forms = {item: "text"}
    for encoder in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encoder(raw).decode()
        forms[encoded] = forms[encoded.rstrip("=")] = "wrapped"
        for core in base64_cores(raw, encoder):
            forms.setdefault(core, "wrapped")
    forms.setdefault(base64.b32encode(raw).decode().rstrip("="), "wrapped")
    forms.setdefault(raw.hex(), "hex")
    for encoded in (urllib.parse.quote(item, safe=""), urllib.parse.quote_plus(item, safe=""),
                    urllib.parse.quote(item)):
        forms.setdefault(encoded, "url" if "%" in encoded else "text")
    for encoded in (json.dumps(item)[1:-1], json.dumps(item, ensure_ascii=False)[1:-1],
                    json.dumps(json.dumps(item))[1:-1]):
        forms.setdefault(encoded, "text")
    return {f: kind for f, kind in forms.items() if f}


def secret_forms(value: str) -> set:
    """``value`` and the encodings a command might print it in, as exact strings.

    Plain, base64 and URL-safe base64 (padded, unpadded, and the cores of every byte
    alignment - :func:`base64_cores`), base32, hex, URL-encoded (three ways) and JSON-escaped
    (three ways). A JSON object value (synthetic_db) also contributes each of its string
    fields. :func:`redact` additionally matches base64 and hex across line breaks and hex and
    percent-escapes in any letter case.
    """
    forms = set()
    for item in _string_values(value):
        forms.update(_encoded_forms(item))
    return forms


def _pattern(form: str, kind: str) -> str:
    if kind == "text":
        return re.escape(form)
    if kind == "url":
        return "(?i:%s)" % re.escape(form)
    body = _WRAP.join(re.escape(c) for c in form)
    return "(?i:%s)" % body if kind == "hex" else body


def redaction_pattern(values):
    """One compiled regex matching every form of every value (longest forms first), or None."""
    forms = {}
    for value in values:
        if value:
            for item in _string_values(value):
                for form, kind in _encoded_forms(item).items():
                    # The most permissive kind wins when two encodings coincide.
                    if forms.get(form) not in ("hex", "wrapped"):
                        forms[form] = kind
    if not forms:
        return None
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join(_pattern(f, forms[f]) for f in ordered))


def redact(text: str, values) -> str:
    """``text`` with every form (see :func:`secret_forms`) of every value replaced by ``********``."""
    if not text:
        return text
    pattern = redaction_pattern(values)
    return pattern.sub(MASK, text) if pattern else text


# ---------------------------------------------------------------- tmpfs store

def mount_fstype(path: str, mounts_file: str = "/proc/mounts") -> str:
    """The file-system type of the mount holding ``path`` (fails closed when unknown)."""
    real = os.path.realpath(path)
    try:
        with open(mounts_file, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise SecretError("cannot read %s to prove %s is a tmpfs: %s" % (mounts_file, path, exc)) from None
    best, fstype = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].encode().decode("unicode_escape")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, fields[2]
    if fstype is None:
        raise SecretError("no mount found for %s; refusing to store secrets there" % path)
    return fstype


def require_tmpfs(directory: str) -> None:
    """Raise :class:`SecretError` unless ``directory``'s parent is on a tmpfs."""
    parent = os.path.dirname(os.path.abspath(directory)) or "/"
    fstype = mount_fstype(parent)
    if fstype != "tmpfs":
        raise SecretError("%s is on %s, not tmpfs; secrets must never touch a disk - use a directory under "
                          "/dev/shm" % (parent, fstype))


def write_secret_file(directory: str, name: str, value: str) -> None:
    """Write ``value`` to ``directory/name`` as a 0600 file, atomically, never following symlinks."""
    if not NAME_RE.match(name):
        raise SecretError("secret file name %r is not valid: use letters, digits, '.', '_' and '-'" % (name,))
    atomic_write(os.path.join(directory, name), value.encode("utf-8"), 0o600)


def read_secret_file(directory: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise SecretError("secret name %r is not valid" % (name,))
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SecretError("secret %r is not in the tmpfs store %s" % (name, directory)) from None
    except OSError as exc:
        raise SecretError("cannot read secret %r from %s: %s" % (name, directory, exc.strerror)) from None
    with os.fdopen(fd, "rb") as handle:
        return handle.read().decode("utf-8")


def wipe_dir(directory: str) -> bool:
    """Overwrite and remove every file of ``directory``, then the directory; True when it existed."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        raise SecretError("%s is not a directory; refusing to remove it" % directory)
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                size = os.lstat(path).st_size
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(b"\0" * size)
            os.unlink(path)
        for name in dirs:
            path = os.path.join(root, name)
            if os.path.islink(path):
                os.unlink(path)
            else:
                os.rmdir(path)
    os.rmdir(directory)
    return True


# ---------------------------------------------------------------- the drill_secrets backend

TAG_KIND = "drguard:secret-kind"
TAG_FINGERPRINT = "drguard:fingerprint"
META_FILE = ".drguard-meta.json"
KEY_DELETION_DAYS = 7
# How long KMS may reject a key policy naming a reader role created a moment ago (IAM
# propagation) before that counts as a real rejection.
KEY_POLICY_WAIT = 45
_ROLE_ARN_RE = re.compile(r"^arn:(aws[a-z-]*):iam::(\d{12}):role/[\w+=,.@/-]+$")
_AWS_ERRORS = (ClientError, BotoCoreError) if ClientError else ()
# Empty only without botocore, when AnsibleAWSModule has failed before any call (pylint cannot tell).
# pylint: disable=catching-non-exception,bad-exception-cause


def secret_prefix(drill_id: str) -> str:
    """The Secrets Manager name prefix of a drill's secrets, ``drguard/<drill_id>/``."""
    return "drguard/%s/" % drill_id


def alias_name(drill_id: str) -> str:
    """The alias of a drill's KMS key, ``alias/drguard/<drill_id>``."""
    return "alias/drguard/%s" % drill_id


def default_tmpfs_dir(drill_id: str) -> str:
    """The default tmpfs store of a drill, ``/dev/shm/drguard-<drill_id>``."""
    return os.path.join(TMPFS_ROOT, "drguard-%s" % drill_id)


def key_policy(partition: str, account: str, reader_role_arn: str, region: str) -> dict:
    """The drill key's policy: the account administers it, the reader decrypts through Secrets Manager only."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "AccountAdministers", "Effect": "Allow",
         "Principal": {"AWS": "arn:%s:iam::%s:root" % (partition, account)},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "DrillReaderDecryptsViaSecretsManager", "Effect": "Allow",
         "Principal": {"AWS": reader_role_arn}, "Action": "kms:Decrypt", "Resource": "*",
         "Condition": {"StringEquals": {"kms:ViaService": "secretsmanager.%s.amazonaws.com" % region}}},
    ]}


def secret_policy(reader_role_arn: str) -> dict:
    """A drill secret's resource policy: only the reader role may read its value."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "DrillReaderReads", "Effect": "Allow", "Principal": {"AWS": reader_role_arn},
         "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"], "Resource": "*"},
        {"Sid": "NobodyElseReads", "Effect": "Deny", "Principal": "*",
         "Action": "secretsmanager:GetSecretValue", "Resource": "*",
         "Condition": {"StringNotEquals": {"aws:PrincipalArn": reader_role_arn}}},
    ]}


def is_drill_owned(tags: dict, drill_id: str) -> bool:
    """True when ``tags`` carry the full drill tag set of ``drill_id`` (managed, id, a valid expiry)."""
    if tags.get(TAG_MANAGED) != "true" or tags.get(TAG_DRILL_ID) != drill_id:
        return False
    try:
        parse_time(tags.get(TAG_EXPIRES_AT) or "")
    except DrillError:
        return False
    return True


def _ignore(_value):
    return None


class Secrets:
    """A drill's secrets in Secrets Manager or the tmpfs store (the options of ``drill_secrets``).

    ``client(service)`` returns a client that retries transient errors (``_aws.aws_client``
    bound to the module); ``hide(value)`` marks a value as secret in the module's output;
    ``warn(msg)`` reports a warning. :meth:`run` returns the module's result; every failure
    raises :class:`SecretError`, with the actions done so far where the module reported them.
    """

    def __init__(self, params: dict, client=None, *, region=None, check_mode=False, hide=None, warn=None):  # noqa: PLR0913
        self.p = params
        self.drill_id = params["drill_id"]
        self._client = client
        self.region = region
        self.check_mode = check_mode
        self.hide = hide or _ignore
        self.warn = warn or _ignore
        self.actions = []
        self.changed = False
        self.lock = threading.Lock()

    def run(self) -> dict:
        """Bring the drill's store to ``state``; the result of the module (``changed``, ``secrets``, ...)."""
        try:
            validate_drill_id(self.drill_id)
        except DrillError as exc:
            raise SecretError(str(exc)) from None
        tmpfs = self.p["store"] == "tmpfs"
        if self.p["state"] == "absent":
            return self.tmpfs_absent() if tmpfs else self.sm_absent()
        if not self.p["expires_at"]:
            raise SecretError("expires_at is required with state=present; pass the drill's expiry")
        try:
            tags = drill_tags(self.drill_id, self.p["expires_at"])
        except DrillError as exc:
            raise SecretError(str(exc)) from None
        entries = self.validated_entries()
        return self.tmpfs_present(entries, tags) if tmpfs else self.sm_present(entries, tags)

    def act(self, line: str) -> bool:
        with self.lock:
            self.actions.append(line)
            self.changed = True
        return not self.check_mode

    def error(self, msg: str, **kwargs) -> SecretError:
        """A :class:`SecretError` that reports the actions done so far."""
        return SecretError(msg, actions=list(self.actions), **kwargs)

    # ------------------------------------------------------------ input
    def validated_entries(self) -> list:
        entries, seen = [], set()
        for item in self.p["secrets"]:
            name, kind, value = item["name"], item["kind"], item.get("value")
            if not NAME_RE.match(name):
                raise self.error("secret name %r is not valid: use 1-64 letters, digits, '.', '_' and '-', starting "
                                 "with a letter or digit" % name)
            if name in seen:
                raise self.error("secret name %r is given twice; names must be unique" % name)
            seen.add(name)
            if kind == "masked":
                if not value:
                    raise self.error("secret %r is masked but has no value; pass the production value to mask"
                                     % name)
                try:
                    value = mask(value, self.p["masking_key"] or "")
                except SecretError as exc:
                    raise self.error("secret %r cannot be masked: %s" % (name, exc)) from None
                self.hide(value)
            elif value is not None:
                raise self.error("secret %r has a value but kind %s; only masked secrets take a value" % (name, kind))
            entries.append({"name": name, "kind": kind, "masked": value})
        return entries

    def new_value(self, entry) -> str:
        if entry["kind"] == "masked":
            return entry["masked"]
        value = synthetic_db() if entry["kind"] == "synthetic_db" else synthetic_token()
        self.hide(value)
        return value

    def fingerprint(self, entry) -> str:
        return fingerprint(entry["masked"], self.p["masking_key"]) if entry["kind"] == "masked" else "synthetic"

    # ------------------------------------------------------------ tmpfs
    def tmpfs_dir(self) -> str:
        return os.path.abspath(self.p["tmpfs_dir"] or default_tmpfs_dir(self.drill_id))

    def tmpfs_present(self, entries, tags) -> dict:
        directory = self.tmpfs_dir()
        try:
            require_tmpfs(directory)
            # Created 0700, or an existing one checked (ours, no symlink) and tightened to 0700.
            if os.path.lexists(directory) or self.act("create tmpfs store %s" % directory):
                ensure_private_dir(directory)
            meta = os.path.join(directory, META_FILE)
            if not os.path.exists(meta) and self.act("write %s" % META_FILE):
                atomic_write_json(meta, {"drill_id": self.drill_id, "expires_at": tags[TAG_EXPIRES_AT],
                                         "managed": True})
            results = []
            for entry in entries:
                path = os.path.join(directory, entry["name"])
                current = read_secret_file(directory, entry["name"]) if os.path.lexists(path) else None
                if current is None:
                    if self.act("write %s" % path):
                        write_secret_file(directory, entry["name"], self.new_value(entry))
                elif entry["kind"] == "masked" and current != entry["masked"]:
                    if self.act("rewrite masked %s" % path):
                        write_secret_file(directory, entry["name"], entry["masked"])
                elif entry["kind"] != "masked":
                    self.hide(current)
                results.append({"name": entry["name"], "kind": entry["kind"], "path": path})
        except (SecretError, OSError) as exc:
            raise self.error("tmpfs store %s: %s" % (directory, exc)) from None
        return dict(changed=self.changed, store="tmpfs", tmpfs_dir=directory, secrets=results, actions=self.actions)

    def tmpfs_absent(self) -> dict:
        directory = self.tmpfs_dir()
        names = []
        if os.path.isdir(directory) and not os.path.islink(directory):
            names = sorted(n for n in os.listdir(directory) if n != META_FILE and not n.startswith("."))
        if os.path.lexists(directory) and self.act("wipe and remove %s" % directory):
            try:
                wipe_dir(directory)
            except (SecretError, OSError) as exc:
                raise self.error("cannot remove tmpfs store %s: %s" % (directory, exc)) from None
        return dict(changed=self.changed, store="tmpfs", tmpfs_dir=directory, actions=self.actions,
                    secrets=[{"name": n, "path": os.path.join(directory, n)} for n in names])

    # ------------------------------------------------------------ Secrets Manager
    def find_key(self, kms):
        """The key behind the drill's alias, or None; raises unless that key carries this drill's tags.

        The alias is only a name: whoever can create aliases could point it at any key, so
        the key's own tags decide whether this module may change its policy or delete it.
        """
        alias = alias_name(self.drill_id)
        try:
            key = kms.describe_key(KeyId=alias)["KeyMetadata"]
        except ClientError as e:
            if is_not_found(e):
                return None
            raise
        tags = boto3_tag_list_to_ansible_dict(paginate(kms, "list_resource_tags", "Tags", KeyId=key["KeyId"]),
                                              "TagKey", "TagValue")
        if not is_drill_owned(tags, self.drill_id):
            raise self.error("KMS key %s behind %s is not tagged as this drill's key (%s=true, %s=%s, a valid %s); "
                             "refusing to change or delete it - point the alias back at the drill's key or use a "
                             "new drill id" % (key["Arn"], alias, TAG_MANAGED, TAG_DRILL_ID, self.drill_id,
                                               TAG_EXPIRES_AT), kms_key_arn=key["Arn"], kms_alias=alias)
        return key

    def ensure_key(self, kms, tags, policy):
        key = self.find_key(kms)
        if key is not None:
            if key.get("KeyState") == "PendingDeletion":
                raise self.error("the drill's KMS key %s is pending deletion; use a new drill id" % key["Arn"])
            current = kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]
            if policies_differ(current, policy) and self.act("update key policy of %s" % key["Arn"]):
                kms.put_key_policy(KeyId=key["KeyId"], PolicyName="default", Policy=json.dumps(policy))
            return key["Arn"]
        if not self.act("create KMS key %s" % alias_name(self.drill_id)):
            return None

        def create():
            return kms.create_key(
                Description="drguard drill %s: secrets" % self.drill_id, KeyUsage="ENCRYPT_DECRYPT",
                KeySpec="SYMMETRIC_DEFAULT", Policy=json.dumps(policy),
                Tags=ansible_dict_to_boto3_tag_list(tags, "TagKey", "TagValue"))["KeyMetadata"]

        def malformed(exc):
            # A role created a moment ago may not be a valid principal yet.
            return error_code(exc) == "MalformedPolicyDocumentException"

        try:
            key = retry_while(create, malformed, KEY_POLICY_WAIT)
        except ClientError as e:
            if malformed(e):
                raise SecretError("KMS rejects the key policy for reader role %s" % self.p["reader_role_arn"],
                                  exception=e) from e
            raise
        kms.create_alias(AliasName=alias_name(self.drill_id), TargetKeyId=key["KeyId"])
        return key["Arn"]

    def ensure_secret(self, sm, entry, key_arn, tags, policy) -> dict:
        secret_id = secret_prefix(self.drill_id) + entry["name"]
        want_tags = dict(tags, **{TAG_KIND: entry["kind"], TAG_FINGERPRINT: self.fingerprint(entry)})
        try:
            current = sm.describe_secret(SecretId=secret_id)
        except ClientError as e:
            if not is_not_found(e):
                raise
            current = None
        arn = current["ARN"] if current else None
        if current is None:
            if self.act("create secret %s" % secret_id):
                kwargs = dict(Name=secret_id, SecretString=self.new_value(entry),
                              Tags=ansible_dict_to_boto3_tag_list(want_tags),
                              Description="drguard drill %s: %s" % (self.drill_id, entry["kind"]))
                if key_arn:
                    kwargs["KmsKeyId"] = key_arn
                arn = sm.create_secret(**kwargs)["ARN"]
        else:
            if current.get("DeletedDate"):
                raise SecretError("secret %s is scheduled for deletion; remove it first (state=absent)" % secret_id)
            have = boto3_tag_list_to_ansible_dict(current.get("Tags"))
            if have.get(TAG_DRILL_ID) != self.drill_id or have.get(TAG_MANAGED) != "true":
                raise SecretError("secret %s exists but is not tagged for this drill (%s=true, %s=%s); refusing to "
                                  "touch it - remove it or use a new drill id"
                                  % (secret_id, TAG_MANAGED, TAG_DRILL_ID, self.drill_id))
            if key_arn and current.get("KmsKeyId") not in (key_arn, key_arn.split("/")[-1], alias_name(
                    self.drill_id)) and self.act("re-encrypt %s with the drill key" % secret_id):
                sm.update_secret(SecretId=secret_id, KmsKeyId=key_arn)
            if (entry["kind"] == "masked" and have.get(TAG_FINGERPRINT) != want_tags[TAG_FINGERPRINT]
                    and self.act("rewrite masked secret %s" % secret_id)):
                sm.put_secret_value(SecretId=secret_id, SecretString=entry["masked"])
            stale = {k: v for k, v in want_tags.items() if have.get(k) != v}
            if stale and self.act("tag secret %s" % secret_id):
                sm.tag_resource(SecretId=secret_id, Tags=ansible_dict_to_boto3_tag_list(stale))
        if arn:
            try:
                have_policy = sm.get_resource_policy(SecretId=secret_id).get("ResourcePolicy")
            except ClientError as e:
                if not is_not_found(e):
                    raise
                have_policy = None
            if (have_policy is None or policies_differ(have_policy, policy)) and self.act(
                    "set resource policy of %s" % secret_id):
                sm.put_resource_policy(SecretId=secret_id, ResourcePolicy=json.dumps(policy), BlockPublicPolicy=True)
        elif not self.check_mode:
            raise SecretError("secret %s has no ARN" % secret_id)
        return {"name": entry["name"], "kind": entry["kind"], "secret_id": secret_id, "arn": arn}

    def sm_present(self, entries, tags) -> dict:
        reader = self.p["reader_role_arn"]
        match = _ROLE_ARN_RE.match(reader or "")
        if not match:
            raise self.error("reader_role_arn %r is not an IAM role ARN; pass the drill role (mint_credentials' "
                             "role_arn)" % (reader,))
        partition, account = match.groups()
        if not self.region:
            raise self.error("no AWS region; set region or AWS_REGION")
        sm, kms = self._client("secretsmanager"), self._client("kms")
        try:
            key_arn = self.ensure_key(kms, tags, key_policy(partition, account, reader, self.region))
        except _AWS_ERRORS as e:
            raise SecretError("Cannot set up the drill's KMS key %s" % alias_name(self.drill_id), exception=e) from e
        policy = secret_policy(reader)
        try:
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(entries)))) as pool:
                results = list(pool.map(lambda e: self.ensure_secret(sm, e, key_arn, tags, policy), entries))
        except SecretError as exc:
            raise self.error(exc.message, exception=exc.exception) from exc.exception
        except _AWS_ERRORS as e:
            raise SecretError("Cannot store the drill's secrets", exception=e) from e
        return dict(changed=self.changed, store="secretsmanager", kms_key_arn=key_arn,
                    kms_alias=alias_name(self.drill_id), secrets=results, actions=self.actions)

    def sm_absent(self) -> dict:
        sm, kms = self._client("secretsmanager"), self._client("kms")
        prefix = secret_prefix(self.drill_id)
        results, skipped = [], []
        try:
            listed = paginate(sm, "list_secrets", "SecretList", Filters=[{"Key": "name", "Values": [prefix]}])
            found = [s for s in listed if s["Name"].startswith(prefix)]
            for item in found:
                # The name is only a filter: the secret's own tags (read fresh) say whether it is ours.
                try:
                    described = sm.describe_secret(SecretId=item["ARN"])
                except ClientError as e:
                    if is_not_found(e):
                        continue
                    raise
                entry = {"name": item["Name"][len(prefix):], "secret_id": item["Name"], "arn": item["ARN"]}
                tags = boto3_tag_list_to_ansible_dict(described.get("Tags"))
                if tags.get(TAG_DRILL_ID) != self.drill_id or tags.get(TAG_MANAGED) != "true":
                    skipped.append(dict(entry, reason="not tagged for this drill"))
                    continue
                results.append(entry)
                if self.act("delete secret %s without recovery" % item["Name"]):
                    try:
                        sm.delete_secret(SecretId=item["ARN"], ForceDeleteWithoutRecovery=True)
                    except ClientError as e:
                        if not is_not_found(e):
                            raise
            key = self.find_key(kms)
            if key:
                if key.get("KeyState") != "PendingDeletion" and self.act(
                        "schedule deletion of KMS key %s in %d days" % (key["Arn"], KEY_DELETION_DAYS)):
                    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=KEY_DELETION_DAYS)
                if self.act("delete alias %s" % alias_name(self.drill_id)):
                    kms.delete_alias(AliasName=alias_name(self.drill_id))
        except _AWS_ERRORS as e:
            raise SecretError("Cannot remove the drill's secrets", exception=e) from e
        if skipped:
            self.warn("%d secret(s) under %s are not tagged for this drill and were left alone: %s"
                      % (len(skipped), prefix, ", ".join(s["secret_id"] for s in skipped)))
        return dict(changed=self.changed, store="secretsmanager", kms_key_arn=key["Arn"] if key else None,
                    kms_alias=alias_name(self.drill_id), secrets=results, skipped=skipped, actions=self.actions)
