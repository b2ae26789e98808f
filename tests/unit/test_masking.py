"""Keyed masking of production secrets (pure Python, no emulator)."""

from __future__ import annotations

import random
import re
import string
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))

from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec  # noqa: E402

KEY = "control-plane-key-0123456789abcdef"
OTHER_KEY = "another-control-plane-key-987654"
RNG = random.Random(20261129)  # reproducible samples; the masking itself is keyed, not random


def rand(alphabet, n):
    return "".join(RNG.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
SAMPLES = [
    "ghp_" + rand(ALNUM, 36),
    "github_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59),
    "AKIA" + rand(string.ascii_uppercase + string.digits, 16),
    "sk_live_" + rand(ALNUM, 24),
    "xoxb-" + rand(string.digits, 12) + "-" + rand(string.digits, 13) + "-" + rand(ALNUM, 24),
    "glpat-" + rand(ALNUM + "_-", 20),
    "myapp_" + rand(ALNUM, 32),
    rand("0123456789abcdef", 64),
    rand("0123456789ABCDEF", 40),
    "%s-%s-%s-%s-%s" % (rand("0123456789abcdef", 8), rand("0123456789abcdef", 4), rand("0123456789abcdef", 4),
                        rand("0123456789abcdef", 4), rand("0123456789abcdef", 12)),
    rand(ALNUM + "+/", 40) + "==",
    "Summer-2024!",
]


def shape(value):
    def cls(c):
        for name, chars in (("l", string.ascii_lowercase), ("u", string.ascii_uppercase), ("d", string.digits)):
            if c in chars:
                return name
        return c if c in "-_.:/+=@~ " else "s"
    return "".join(cls(c) for c in value)


@pytest.mark.parametrize("value", SAMPLES)
def test_shape_and_prefix_preserved(value):
    masked = sec.mask(value, KEY)
    prefix, rest = sec.split_prefix(value)
    assert masked.startswith(prefix) and len(masked) == len(value)
    assert masked != value and value not in masked
    if re.fullmatch(r"[0-9a-f-]{8,}", rest) and re.search("[a-f]", rest):
        assert re.fullmatch(r"[0-9a-f-]+", masked[len(prefix):]) and shape(masked).count("-") == rest.count("-")
    elif re.fullmatch(r"[0-9A-F]{8,}", rest) and re.search("[A-F]", rest):
        assert re.fullmatch(r"[0-9A-F]+", masked[len(prefix):])
    else:
        assert shape(masked) == shape(value)


def test_known_prefixes():
    assert sec.split_prefix("ghp_abc")[0] == "ghp_"
    assert sec.split_prefix("github_pat_11ABC")[0] == "github_pat_"
    assert sec.split_prefix("AKIAIOSFODNN7EXAMPLE")[0] == "AKIA"
    assert sec.split_prefix("sk_live_51Hx")[0] == "sk_live_"
    assert sec.split_prefix("xoxb-1234")[0] == "xoxb-"
    assert sec.split_prefix("myapp-" + "x" * 20)[0] == "myapp-"
    # A short value is not a token with a prefix: everything is masked.
    assert sec.split_prefix("summer-2024")[0] == ""


def test_formats_still_validate():
    aws_key = sec.mask("AKIAIOSFODNN7EXAMPLE", KEY)
    assert re.fullmatch(r"AKIA[A-Z0-9]{16}", aws_key)
    uuid_like = sec.mask("0b5e5f54-9a0c-4d55-8e0b-6d7f1c2a3b4c", KEY)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", uuid_like)
    github = sec.mask("ghp_" + "a1B2" * 9, KEY)
    assert re.fullmatch(r"ghp_[A-Za-z0-9]{36}", github)


def test_deterministic_per_key_and_keys_differ():
    for value in SAMPLES:
        assert sec.mask(value, KEY) == sec.mask(value, KEY)
        assert sec.mask(value, KEY) != sec.mask(value, OTHER_KEY)
    # Nearby originals give unrelated masks (no character-by-character mapping).
    a, b = "ghp_" + "A" * 35 + "b", "ghp_" + "A" * 35 + "c"
    same = sum(x == y for x, y in zip(sec.mask(a, KEY)[4:], sec.mask(b, KEY)[4:], strict=True))
    assert same < 10


def _grams(text, n):
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def test_nothing_of_the_secret_survives_statistically():
    """Over many samples, shared substrings are no more frequent than between unrelated values."""
    n_samples, shared_orig, shared_ctrl, longest = 400, 0, 0, 0
    for _ in range(n_samples):
        value = "ghp_" + rand(ALNUM, 36)
        control = "ghp_" + rand(ALNUM, 36)
        masked_rest = sec.mask(value, KEY)[4:]
        shared_orig += len(_grams(masked_rest, 4) & _grams(value[4:], 4))
        shared_ctrl += len(_grams(masked_rest, 4) & _grams(control[4:], 4))
        for n in range(3, 12):
            if _grams(masked_rest, n) & _grams(value[4:], n):
                longest = max(longest, n)
        assert value[4:] not in sec.mask(value, KEY)
    # For random 62-symbol tokens, a shared 4-gram is a ~1-in-10 event per pair; a
    # leak would show up as many more shared grams than with an unrelated control.
    assert shared_orig <= max(10, 3 * shared_ctrl)
    assert longest < 6


def test_digits_only_secret_is_still_masked():
    pins = [rand(string.digits, 12) for _ in range(200)]
    masked = [sec.mask(p, KEY) for p in pins]
    assert all(m != p and len(m) == len(p) and m.isdigit() for m, p in zip(masked, pins, strict=True))
    same_position = sum(a == b for m, p in zip(masked, pins, strict=True) for a, b in zip(m, p, strict=True))
    assert same_position < 200 * 12 * 0.2  # chance level is 10 %


@pytest.mark.parametrize(("value", "key", "needle"), [
    ("ghp_x", "short", "at least 16"),
    ("", KEY, "non-empty value"),
    ("----", KEY, "nothing to mask"),
])
def test_mask_errors(value, key, needle):
    with pytest.raises(sec.SecretError, match=needle):
        sec.mask(value, key)


def test_redact_all_forms():
    secret = "p@ss w/rd+\"q\"-" + rand(ALNUM, 12)
    import base64
    import json
    import urllib.parse
    text = "\n".join([secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe=""),
                      json.dumps({"s": secret}), secret.encode().hex()])
    out = sec.redact(text, [secret])
    assert secret not in out and out.count(sec.MASK) == 5
    db = json.dumps({"username": "u_1234567", "password": "Pw" + rand(ALNUM, 20)})
    assert json.loads(db)["password"] not in sec.redact("pw=" + json.loads(db)["password"], [db])


# ---------------------------------------------------------------- redaction, one test per encoding
# The encoders below are the test's own (not _secrets.secret_forms): each embeds the secret the
# way a careless command would print it; recoverable() then tries every decoding on the output.
import base64  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402
import urllib.parse  # noqa: E402

SECRET = 'p@ss w/rd+"q"-' + rand(ALNUM, 14) + "é~"


def _b64_blob(secret, shift, encoder=base64.b64encode):
    """The secret inside a longer byte string, starting at byte offset ``shift`` (mod 3), base64-encoded."""
    return encoder(b"x-" * 5 + b"k" * shift + secret.encode() + b";tail=1;").decode()


def _wrapped(text, width, sep="\n"):
    return sep.join(textwrap.wrap(text, width, break_on_hyphens=False)) + sep


ENCODINGS = {
    "plain": str,
    "base64": lambda s: base64.b64encode(s.encode()).decode(),
    "base64-unpadded": lambda s: base64.b64encode(s.encode()).decode().rstrip("="),
    "base64-urlsafe": lambda s: base64.urlsafe_b64encode(s.encode()).decode(),
    "base64-urlsafe-unpadded": lambda s: base64.urlsafe_b64encode(s.encode()).decode().rstrip("="),
    "base64-offset-0": lambda s: _b64_blob(s, 0),
    "base64-offset-1": lambda s: _b64_blob(s, 1),
    "base64-offset-2": lambda s: _b64_blob(s, 2),
    "base64-urlsafe-offset-1": lambda s: _b64_blob(s, 1, base64.urlsafe_b64encode),
    "base64-urlsafe-offset-2": lambda s: _b64_blob(s, 2, base64.urlsafe_b64encode),
    "base64-wrapped-76": lambda s: base64.encodebytes(b"header " * 9 + s.encode() + b" trailer " * 9).decode(),
    "base64-wrapped-64": lambda s: _wrapped(_b64_blob(s, 1) * 1 + base64.b64encode(b"z" * 40).decode(), 64),
    "base64-wrapped-64-crlf": lambda s: _wrapped(_b64_blob(s, 2), 64, "\r\n"),
    "base64-wrapped-json-escaped": lambda s: json.dumps(_wrapped(_b64_blob(s, 0), 16))[1:-1],
    "http-basic": lambda s: "Authorization: Basic " + base64.b64encode(b"drguard_user:" + s.encode()).decode(),
    "http-basic-user": lambda s: "Authorization: Basic " + base64.b64encode(s.encode() + b":pw").decode(),
    "base32": lambda s: base64.b32encode(s.encode()).decode(),
    "hex": lambda s: s.encode().hex(),
    "hex-upper": lambda s: s.encode().hex().upper(),
    "hex-offset-mixed": lambda s: "00ff" + s.encode().hex().upper()[:10] + s.encode().hex()[10:] + "aa",
    "url-encoded": lambda s: urllib.parse.quote(s, safe=""),
    "url-encoded-lowercase": lambda s: re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(),
                                              urllib.parse.quote(s, safe="")),
    "url-encoded-plus": lambda s: urllib.parse.quote_plus(s, safe=""),
    "url-encoded-path": urllib.parse.quote,
    "json-escaped": lambda s: json.dumps(s)[1:-1],
    "json-escaped-unicode": lambda s: json.dumps(s, ensure_ascii=False)[1:-1],
    "json-escaped-twice": lambda s: json.dumps(json.dumps(s))[1:-1],
}


def _decodings(chunk, decoder, block):
    """What ``chunk`` (a run of encoded symbols, unpadded) decodes to, with up to ``block`` symbols cut off."""
    out = []
    for cut in range(block):
        part = chunk[:len(chunk) - cut]
        try:
            out.append(decoder(part + "=" * (-len(part) % block)))
        except ValueError:
            continue
    return out


def _json_unescape(text):
    return re.sub(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])', lambda m: json.loads('"\\%s"' % m.group(1)), text)


def recoverable(text, secret):
    """Every way this test knows to get ``secret`` back out of ``text``; empty when it cannot."""
    raw = secret.encode()
    found = []
    flat = text.replace("\\r", "").replace("\\n", "").replace("\r", "").replace("\n", "")
    for view in (text, flat):
        if secret in view:
            found.append("plain")
        for name, alphabet, decoder in (("base64", r"[A-Za-z0-9+/]", base64.b64decode),
                                        ("base64-urlsafe", r"[A-Za-z0-9_-]", base64.urlsafe_b64decode)):
            for run in re.findall(alphabet + "{8,}", view):
                for start in range(4):
                    if any(raw in data for data in _decodings(run[start:], decoder, 4)):
                        found.append(name)
        for run in re.findall(r"[0-9A-Fa-f]{8,}", view):
            for start in range(2):
                chunk = run[start:]
                if raw in bytes.fromhex(chunk[:len(chunk) - len(chunk) % 2]):
                    found.append("hex")
        for run in re.findall(r"[A-Z2-7]{8,}", view):
            for start in range(8):
                if any(raw in data for data in _decodings(run[start:], base64.b32decode, 8)):
                    found.append("base32")
        for unquote in (urllib.parse.unquote, urllib.parse.unquote_plus):
            if secret in unquote(view):
                found.append("url")
        decoded = view
        for _ in range(2):
            decoded = _json_unescape(decoded)
            if secret in decoded:
                found.append("json")
    return sorted(set(found))


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_redact_each_encoding(encoding):
    encoded = ENCODINGS[encoding](SECRET)
    text = "before %s after\n" % encoded
    assert recoverable(text, SECRET), "self-check: %s does not hold the secret in a form this test decodes" % encoding
    out = sec.redact(text, [SECRET])
    assert recoverable(out, SECRET) == [], (encoding, out)
    assert sec.MASK in out and out.startswith("before ")


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_redact_each_encoding_of_a_json_secret_field(encoding):
    """synthetic_db: the password field alone, in every encoding, is redacted too."""
    password = "Pw" + rand(ALNUM, 30)
    db = json.dumps({"username": "drguard_" + rand(string.ascii_lowercase, 10), "password": password})
    out = sec.redact("x " + ENCODINGS[encoding](password) + " y", [db])
    assert recoverable(out, password) == [], (encoding, out)


def test_redact_random_offsets_and_secrets():
    for _ in range(60):
        secret = rand(ALNUM + "-_.~/+", RNG.randint(12, 48))
        blob = bytes(RNG.randrange(256) for _ in range(RNG.randint(0, 40))) + secret.encode() + \
            bytes(RNG.randrange(256) for _ in range(RNG.randint(0, 40)))
        for encoder in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encoder(blob).decode()
            for text in (encoded, base64.encodebytes(blob).decode() if encoder is base64.b64encode else encoded,
                         _wrapped(encoded, 64)):
                out = sec.redact(text, [secret])
                assert recoverable(out, secret) == [], (secret, text, out)
