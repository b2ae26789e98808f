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
import urllib.parse

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


class SecretError(ValueError):
    """Bad secret input or an unsafe store; the message says what and how to fix it."""


# ---------------------------------------------------------------- synthetic values

def synthetic_password(length: int = 32) -> str:
    """A random password with upper, lower, digits and a few shell-safe symbols."""
    alphabet = string.ascii_letters + string.digits + "-_.~"
    while True:
        value = "".join(secrets.choice(alphabet) for _ in range(length))
        if (any(c.islower() for c in value) and any(c.isupper() for c in value)
                and any(c.isdigit() for c in value)):
            return value


def synthetic_db() -> str:
    """A synthetic database login as JSON ``{"username": ..., "password": ...}``."""
    user = "drguard_" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))
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


def ensure_private_dir(directory: str, create: bool = True) -> bool:
    """Make sure ``directory`` is a 0700 directory of ours on a tmpfs; True when created."""
    require_tmpfs(directory)
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        if not create:
            return False
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)
        return True
    if not stat.S_ISDIR(info.st_mode):
        raise SecretError("%s exists and is not a directory (a symlink or file); refusing to use it" % directory)
    if info.st_uid != os.geteuid():
        raise SecretError("%s belongs to uid %d, not to us; refusing to use it" % (directory, info.st_uid))
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    return False


def write_secret_file(directory: str, name: str, value: str) -> None:
    """Write ``value`` to ``directory/name`` as a 0600 file, atomically, never following symlinks."""
    if not NAME_RE.match(name):
        raise SecretError("secret file name %r is not valid: use letters, digits, '.', '_' and '-'" % (name,))
    tmp = os.path.join(directory, ".tmp-%s-%s" % (name, secrets.token_hex(4)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(value.encode("utf-8"))
        os.chmod(tmp, 0o600)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
