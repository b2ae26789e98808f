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
