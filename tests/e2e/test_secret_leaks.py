"""Identity acceptance, end to end: no secret leaks anywhere, and nothing of the identity outlives a drill.

Two complete drills run on the emulator at ``-vvvv`` with the JSON stdout callback and an
Ansible log file: one passes, one fails in phase ``validate`` (after the credentials were
minted and the secrets injected: the validation command itself exits non-zero). Canaries:

* supplied by the test: the masked secret's production ``value`` and ``drill_masking_key``;
* generated inside the drill: the synthetic database username/password, the synthetic token
  and the masked token, captured by the validation command (``CAPTURE_SCRIPT``) into a file
  outside the drill's output root; the command also *prints* every one of them in every
  form below, so that ``secret_exec``'s redaction is exercised, not assumed;
* the minted session (access key id, secret access key, session token) and the trust
  policy's external id, read from the emulator's model dump (``/moto-api/data.json``, the
  STS ``AssumedRole`` of the drill role) - no production code is involved in reading them.

Every byte of stdout, stderr and every file under the drill's output root (log file, JSON and
Markdown report, alerts.jsonl, state.json, ...; the test's own input vars file excepted), the
Ansible temp directories and readable files under /dev/shm is searched for every canary in
plain, base64 (standard and URL-safe, with and without padding), hex, URL-encoded and
JSON-escaped (single and double) forms, upper-case hex, and the base64 symbols that encode
only the canary at each of the three byte alignments (so base64 of a longer string holding
it - an HTTP Basic header - is found); every source is also searched with its line breaks
(real or JSON-escaped) removed, so line-wrapped base64 is found. Limits: a secret
transformed otherwise (hash, slice, compression) is not found.

The command's output reaches the report only when ``drill_validation.report_output`` is true:
the passing drill asks for it (and gets it redacted), the failing one does not (and the
report has no ``command_stdout``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import string
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import pytest


import drillkit
from drillkit import emulator_session, run_drill, runtime_prefix, seed_world

from emulator import Emulator

# The two drills run once per worker that gets one of these tests: keep them together.
pytestmark = pytest.mark.xdist_group("secret_leaks")

ROOT = Path(__file__).resolve().parents[2]
TAG = "drguard:drill-id"
SHM = Path("/dev/shm")
STORES = {"passing": "secretsmanager", "failing": "tmpfs"}
# Ansible writes module payloads (with their arguments) here while a task runs; nothing may stay.
ANSIBLE_TMP_DIRS = (ROOT / ".ansible" / "tmp", Path.home() / ".ansible" / "tmp")

CAPTURE_SCRIPT = textwrap.dedent('''\
    """Validation command of the leak test: records the secrets it received, prints them, maybe fails."""
    import base64, json, os, sys, urllib.parse

    capture, mode = sys.argv[1], sys.argv[2]
    db = os.environ["ORDERS_DB_CREDENTIALS"]
    token = os.environ["SVC_TOKEN"]
    with open(os.path.join(os.environ["DRGUARD_SECRETS_DIR"], "api-token")) as handle:
        masked = handle.read()
    fields = json.loads(db)
    got = {"db_json": db, "db_username": fields["username"], "db_password": fields["password"],
           "svc_token": token, "masked_token": masked,
           "aws_env": sorted(k for k in os.environ if k.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION")))}
    try:
        with open(capture, "w") as handle:
            json.dump(got, handle)
    except OSError:
        # Inside the sandbox (the host read-only, /tmp its own) the capture goes out on stdout, XORed with
        # the test's one-time pad (argv): no form the scan looks for, undone by the test from the report.
        pad = bytes.fromhex(sys.argv[3])
        print("capture:", bytes(a ^ b for a, b in zip(json.dumps(got).encode(), pad)).hex())
    # A careless command: every secret, in every form secret_exec promises to redact.
    for value in (db, fields["username"], fields["password"], token, masked):
        raw = value.encode()
        for form in FORMS:
            print("secret:", form(value, raw))
            print("secret:", form(value, raw), file=sys.stderr)
    sys.exit(0 if mode == "pass" else 3)
''')
# What CAPTURE_SCRIPT prints, one entry per form (some span several lines).
PRINTED_FORMS = textwrap.dedent('''\
    import textwrap
    FORMS = (
        lambda v, r: v,
        lambda v, r: base64.b64encode(r).decode(),
        lambda v, r: base64.urlsafe_b64encode(r).decode(),
        lambda v, r: base64.b64encode(r).decode().rstrip("="),
        lambda v, r: urllib.parse.quote(v, safe=""),
        lambda v, r: urllib.parse.quote_plus(v),
        lambda v, r: json.dumps(v)[1:-1],
        lambda v, r: r.hex(),
        lambda v, r: r.hex().upper(),
        # inside longer base64 strings, at byte offsets 0, 1 and 2 (mod 3)
        lambda v, r: base64.b64encode(b"id=" + r + b";x").decode(),
        lambda v, r: base64.b64encode(b"id=1" + r + b";x").decode(),
        lambda v, r: base64.urlsafe_b64encode(b"id=12" + r + b";x").decode(),
        lambda v, r: "Authorization: Basic " + base64.b64encode(b"drill-user:" + r).decode(),
        # line-wrapped: base64(1) at 76 columns, PEM at 64
        lambda v, r: base64.encodebytes(b"<" * 40 + r + b">" * 40).decode().strip(),
        lambda v, r: "\\n".join(textwrap.wrap(base64.b64encode(b"pem" + r * 2).decode(), 64)),
    )
''')
CAPTURE_SCRIPT = CAPTURE_SCRIPT.replace("capture, mode = sys.argv[1], sys.argv[2]\n",
                                        PRINTED_FORMS + "capture, mode = sys.argv[1], sys.argv[2]\n")
N_PRINTED = 5 * 15  # secrets x FORMS


# ------------------------------------------------------------------ the search

def forms(value: str) -> dict:
    """``{form name: bytes}`` of every encoding of ``value`` searched for."""
    raw = value.encode("utf-8")
    out = {"plain": raw, "hex": raw.hex().encode(), "hex-upper": raw.hex().upper().encode()}
    for name, encoder in (("base64", base64.b64encode), ("base64-urlsafe", base64.urlsafe_b64encode)):
        encoded = encoder(raw)
        out[name] = encoded
        out[name + "-unpadded"] = encoded.rstrip(b"=")
    out["url-encoded"] = urllib.parse.quote(value, safe="").encode()
    out["url-encoded-plus"] = urllib.parse.quote_plus(value, safe="").encode()
    out["url-encoded-path"] = urllib.parse.quote(value).encode()
    out["json-escaped"] = json.dumps(value)[1:-1].encode()
    out["json-escaped-unicode"] = json.dumps(value, ensure_ascii=False)[1:-1].encode("utf-8")
    out["json-escaped-twice"] = json.dumps(json.dumps(value))[1:-1].encode()
    # The symbols that encode only the canary inside a longer base64 string, per byte alignment.
    for name, encoder in (("base64", base64.b64encode), ("base64-urlsafe", base64.urlsafe_b64encode)):
        for shift in range(3):
            encoded = encoder(b"\0" * shift + raw).rstrip(b"=")
            out["%s-at-offset-%d" % (name, shift)] = encoded[(0, 2, 3)[shift]:(shift + len(raw)) * 8 // 6]
    # Identical forms (a value without special characters) are searched once, under the first name.
    seen, unique = set(), {}
    for name, data in out.items():
        if data and data not in seen:
            seen.add(data)
            unique[name] = data
    return unique


class Scan:
    """Searches byte streams and files for canaries; counts what it read."""

    def __init__(self, canaries: dict):
        missing = [k for k, v in canaries.items() if not v or len(v) < 8]
        assert not missing, "canaries too short to search for meaningfully: %s" % missing
        self.needles = [(label, form, data) for label, value in canaries.items()
                        for form, data in forms(value).items()]
        self.hits: list[str] = []
        self.bytes = 0
        self.sources = 0

    def data(self, where: str, blob: bytes) -> None:
        self.bytes += len(blob)
        self.sources += 1
        # Line-wrapped encodings: the same search once more with every line break removed.
        flat = re.sub(rb"(?:\r?\n|\\r\\n|\\n)[ \t]*", b"", blob)
        for label, form, needle in self.needles:
            for view, how in ((blob, ""), (flat, " (line breaks removed)")):
                at = view.find(needle)
                if at >= 0:
                    self.hits.append("%s: canary %r as %s at byte %d%s (%d occurrence(s))"
                                     % (where, label, form, at, how, view.count(needle)))
                    break

    def tree(self, root: Path, skip: tuple = (), strict: bool = True) -> None:
        """Every regular file under ``root``; unreadable files fail unless ``strict`` is false."""
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath, name)
                if path in skip or path.is_symlink() or not path.is_file():
                    continue
                try:
                    blob = path.read_bytes()
                except OSError as exc:
                    # Another engineer's file on a shared tmpfs, or one removed while we walk.
                    if strict:
                        raise AssertionError("cannot read %s to search it: %s" % (path, exc)) from None
                    continue
                self.data(str(path), blob)


# ------------------------------------------------------------------ helpers

def _emulator_json(world, path: str) -> dict:
    with urllib.request.urlopen(world.emu.url + path, timeout=60) as resp:  # noqa: S310 - the emulator's http URL
        return json.loads(resp.read())


def minted_sessions(world, drill_id: str) -> list:
    """The STS sessions of the drill role, read from the emulator's model dump."""
    data = _emulator_json(world, "/moto-api/data.json")
    return [s for s in data.get("sts", {}).get("AssumedRole", [])
            if s.get("role_arn", "").endswith("/drguard-%s" % drill_id)]


def _tags(items, key="Key", value="Value") -> dict:
    return {t[key]: t[value] for t in items or []}


def identity_remains(world, drill_id: str) -> tuple:
    """``(remaining, drill_keys)``: what of the drill's identity still exists; the drill's KMS keys."""
    s = emulator_session()
    iam, sm, kms = (s.client(n, endpoint_url=world.emu.url) for n in ("iam", "secretsmanager", "kms"))
    remaining = []
    for page in iam.get_paginator("list_roles").paginate():
        for role in page["Roles"]:
            name = role["RoleName"]
            tags = _tags(iam.list_role_tags(RoleName=name)["Tags"])
            if drill_id in name or tags.get(TAG) == drill_id:
                remaining.append({"type": "iam_role", "id": name,
                                  "inline": iam.list_role_policies(RoleName=name)["PolicyNames"],
                                  "attached": [p["PolicyArn"] for p in
                                               iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]]})
    for page in iam.get_paginator("list_policies").paginate(Scope="Local"):
        for policy in page["Policies"]:
            tags = _tags(iam.list_policy_tags(PolicyArn=policy["Arn"])["Tags"])
            if drill_id in policy["Arn"] or tags.get(TAG) == drill_id:
                remaining.append({"type": "iam_policy", "id": policy["Arn"]})
    for page in sm.get_paginator("list_secrets").paginate(IncludePlannedDeletion=True):
        for secret in page["SecretList"]:
            if secret["Name"].startswith("drguard/%s/" % drill_id) or _tags(secret.get("Tags")).get(TAG) == drill_id:
                remaining.append({"type": "secret", "id": secret["Name"]})
    drill_keys = []
    for page in kms.get_paginator("list_keys").paginate():
        for key in page["Keys"]:
            meta = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
            tags = _tags(kms.list_resource_tags(KeyId=key["KeyId"]).get("Tags"), "TagKey", "TagValue")
            if tags.get(TAG) == drill_id:
                drill_keys.append(meta)
                if meta["KeyState"] != "PendingDeletion":
                    remaining.append({"type": "kms_key", "id": key["KeyId"], "state": meta["KeyState"]})
    for page in kms.get_paginator("list_aliases").paginate():
        for alias in page["Aliases"]:
            if drill_id in alias["AliasName"]:
                remaining.append({"type": "kms_alias", "id": alias["AliasName"]})
    for dirpath, dirs, files in os.walk(SHM):
        for name in dirs + files:
            path = Path(dirpath, name)
            if drill_id in name:
                remaining.append({"type": "tmpfs", "id": str(path)})
            elif name in files and not path.is_symlink():
                try:
                    if drill_id.encode() in path.read_bytes():
                        remaining.append({"type": "tmpfs", "id": str(path), "why": "content names the drill"})
                except OSError:
                    continue  # another user's file or one removed while we walk
    return remaining, drill_keys


# ------------------------------------------------------------------ the drills

class Drills:
    """Runs at most the two drills of this module, once each, and keeps what the checks need."""

    def __init__(self, world, base: Path):
        self.world, self.base, self.runs = world, base, {}

    def get(self, mode: str) -> dict:
        if mode not in self.runs:
            self.runs[mode] = self._run(mode)
        return self.runs[mode]

    def _run(self, mode: str) -> dict:
        work = self.base / mode
        out_root = work / "runs"
        out_root.mkdir(parents=True, exist_ok=True)
        captured = work / "captured.json"   # outside the output root: the test's own knowledge
        pad = bytes(secrets.randbelow(255) + 1 for _ in range(8192))  # no zero byte: every byte changes
        alphabet = string.ascii_letters + string.digits
        production_value = "ghp_" + "".join(secrets.choice(alphabet) for _ in range(36))
        masking_key = "mk-canary-" + secrets.token_urlsafe(32)
        extra = {
            "drill_secrets": [
                {"name": "orders-db", "kind": "synthetic_db"},
                {"name": "svc-token", "kind": "synthetic_token"},
                {"name": "api-token", "kind": "masked", "value": production_value},
            ],
            "drill_masking_key": masking_key,
            # The passing drill validates inside the netns runtime (the user's command in the app tier), the
            # failing one on the controller (backend none): both paths of phases/validate.yml.
            **({} if mode == "passing" else {"drill_runtime": {"backend": "none"}}),
            # Both stores are covered: Secrets Manager (+ a drill KMS key) passes, tmpfs fails.
            "drill_secret_store": STORES[mode],
            "drill_validation": {
                # The script as -c (inside, a workload sees neither the test's /tmp nor its virtualenv).
                "argv": ["python3", "-c", CAPTURE_SCRIPT, str(captured), "pass" if mode == "passing" else "fail",
                         pad.hex()],
                "env_secrets": {"ORDERS_DB_CREDENTIALS": "orders-db", "SVC_TOKEN": "svc-token"},
                "file_secrets": {"api-token": "api-token"},
                # The passing drill asks for the (redacted) output in its report; the failing one does not.
                **({"report_output": True} if mode == "passing" else {}),
            },
        }
        log = out_root / "ansible.log"
        run = run_drill(self.world, out_root, extra=extra, args=("-vvvv",),
                        env_extra={"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json", "ANSIBLE_LOG_PATH": str(log)})
        if not captured.exists() and run.report.get("validation", {}).get("command_stdout"):
            lines = [x for x in run.report["validation"]["command_stdout"].splitlines() if x.startswith("capture: ")]
            if lines:
                data = bytes.fromhex(lines[0].split(" ", 1)[1])
                captured.write_text(bytes(a ^ b for a, b in zip(data, pad, strict=False)).decode())
        return {"run": run, "out_root": out_root, "log": log, "captured": captured,
                "vars_file": out_root / ("vars-%s.yml" % run.drill_id),
                "supplied": {"production value": production_value, "masking key": masking_key},
                "sessions": minted_sessions(self.world, run.drill_id),
                "remaining": identity_remains(self.world, run.drill_id)}


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    # An emulator of its own: the sessions are read from the emulator's model dump, which
    # should hold this module's drills only.
    base = tmp_path_factory.mktemp("secret-leaks")
    with Emulator() as emu:
        yield Drills(seed_world(emu, base / "world"), base)


def _check_outcome(d: dict, mode: str) -> dict:
    run = d["run"]
    report = run.report
    if mode == "passing":
        assert run.rc == 0 and report["outcome"] == "passed", (report.get("error"), run.stdout[-3000:])
    else:
        assert run.rc != 0, run.stdout[-3000:]
        assert report["outcome"] == "failed" and report["failed_phase"] == "validate", report.get("error")
        assert "exited with rc 3" in report["error"], report["error"]
    return report


# ------------------------------------------------------------------ tests

def test_scanner_finds_a_planted_canary_in_every_form(tmp_path):
    canary = "ghp_" + secrets.token_hex(18) + "/+="
    clean = tmp_path / "clean.txt"
    clean.write_text("nothing to see here " * 100)
    scan = Scan({"planted": canary})
    scan.tree(tmp_path)
    assert scan.hits == [] and scan.sources == 1
    for name, data in forms(canary).items():
        planted = tmp_path / ("planted-%s.bin" % name)
        planted.write_bytes(b"prefix " + data + b" suffix")
        scan = Scan({"planted": canary})
        scan.tree(tmp_path)
        assert any(str(planted) in hit and "as %s" % name in hit for hit in scan.hits), (name, scan.hits)
        planted.unlink()
    scan = Scan({"planted": canary})
    scan.data("stdout", json.dumps({"msg": canary}).encode())
    assert scan.hits and scan.hits[0].startswith("stdout: canary 'planted'"), scan.hits
    # Inside longer base64 strings at every alignment (HTTP Basic), and line-wrapped (really or JSON-escaped).
    raw = canary.encode()
    for label, blob in (("offset-%d" % k, base64.b64encode(b"u" * k + b"ser:" + raw + b"!")) for k in range(3)):
        scan = Scan({"planted": canary})
        scan.data(label, b"Authorization: Basic " + blob)
        assert any("as base64-at-offset" in hit for hit in scan.hits), (label, scan.hits)
    wrapped = base64.encodebytes(b"-" * 50 + raw + b"-" * 50)
    for label, blob in (("wrapped", wrapped), ("wrapped-json", json.dumps(wrapped.decode()).encode())):
        scan = Scan({"planted": canary})
        scan.data(label, blob)
        assert any("(line breaks removed)" in hit for hit in scan.hits), (label, scan.hits)


@pytest.mark.parametrize("mode", ["passing", "failing"])
def test_no_secret_leaks_anywhere(drills, mode):
    d = drills.get(mode)
    run = d["run"]
    report = _check_outcome(d, mode)
    assert d["log"].is_file() and d["log"].stat().st_size > 0, "ANSIBLE_LOG_PATH produced no log"
    assert run.stdout.lstrip().startswith("{") or '"plays"' in run.stdout, "the JSON callback was not used"
    assert d["captured"].is_file(), "the validation command did not run: %s" % report.get("error")
    got = json.loads(d["captured"].read_text())
    assert got["aws_env"] == [], "controller AWS credentials reached the validation command: %s" % got["aws_env"]
    assert len(d["sessions"]) >= 1, "no STS session of drguard-%s in the emulator's model dump" % run.drill_id
    canaries = dict(d["supplied"])
    canaries.update({"synthetic db json": got["db_json"], "synthetic db username": got["db_username"],
                     "synthetic db password": got["db_password"], "synthetic token": got["svc_token"],
                     "masked token": got["masked_token"]})
    for i, session in enumerate(d["sessions"]):
        canaries["minted access key id #%d" % i] = session["access_key_id"]
        canaries["minted secret access key #%d" % i] = session["secret_access_key"]
        canaries["minted session token #%d" % i] = session["session_token"]
        if session.get("external_id"):
            canaries["trust policy external id #%d" % i] = session["external_id"]
    # The masked token really is a look-alike, not the production value.
    assert got["masked_token"] != d["supplied"]["production value"]
    assert got["masked_token"].startswith("ghp_") and len(got["masked_token"]) == 40

    # The search can fail on this very data: the test's own files hold the canaries it looks for.
    probe = Scan(canaries)
    probe.data("vars file", d["vars_file"].read_bytes())
    probe.data("captured", d["captured"].read_bytes())
    probe.data("session", json.dumps(d["sessions"]).encode())
    found = {hit.split("canary ")[1].split(" as ")[0].strip("'") for hit in probe.hits}
    assert found == set(canaries), "self-check: canaries not found where planted: %s" % (set(canaries) - found)

    scan = Scan(canaries)
    scan.data("ansible-playbook stdout", run.stdout.encode())
    scan.data("ansible-playbook stderr", run.stderr.encode())
    files_before = scan.sources
    scan.tree(d["out_root"], skip=(d["vars_file"],))   # the vars file is the test's input, not drill output
    output_files = scan.sources - files_before
    for must in ("drill-report.json", "drill-report.md", "state.json"):
        assert (run.output_dir / must).is_file(), "%s missing from %s" % (must, run.output_dir)
    for tmp in ANSIBLE_TMP_DIRS:
        if tmp.is_dir():
            scan.tree(tmp, strict=False)
    scan.tree(SHM, strict=False)
    print("%s drill %s: %d canaries x forms = %d needles; %d bytes in %d sources (%d files under the output root)"
          % (mode, run.drill_id, len(canaries), len(scan.needles), scan.bytes, scan.sources, output_files))
    assert scan.hits == [], "secret canaries leaked (%d hit(s)):\n%s" % (len(scan.hits), "\n".join(scan.hits))
    validation = report["validation"]
    assert validation["command_rc"] == (0 if mode == "passing" else 3), validation
    # Where it ran: the passing drill's command in the app tier (over the tier rule to the db tier), the
    # failing one's on the controller.
    if mode == "passing":
        assert validation["command_inside"] == runtime_prefix(run.drill_id) + "app", validation
    else:
        assert validation["command_inside"] is None and report["runtime"]["backend"] == "none", validation
    summary = (run.output_dir / "drill-report.md").read_text()
    if mode == "passing":
        # Asked for: the output is there, and the redaction really happened - 5 secrets in every printed
        # form, each of them (wrapped ones included) now holding a mask.
        printed = validation["command_stdout"].split("secret: ")[1:]
        assert len(printed) == N_PRINTED, validation["command_stdout"]
        assert all("********" in form for form in printed), validation["command_stdout"]
        assert "secret: ********" in summary
    else:
        # Not asked for: no command output in either rendering of the report.
        assert "command_stdout" not in validation, validation
        assert "secret:" not in summary and "secret:" not in (run.output_dir / "drill-report.json").read_text()


@pytest.mark.parametrize("mode", ["passing", "failing"])
def test_nothing_of_the_identity_remains_after_teardown(drills, mode):
    d = drills.get(mode)
    run = d["run"]
    report = _check_outcome(d, mode)
    remaining, drill_keys = d["remaining"]
    assert remaining == [], "drill %s left these behind:\n%s" % (run.drill_id, json.dumps(remaining, indent=1))
    assert report["identity"]["secret_store"] == STORES[mode]
    if STORES[mode] == "secretsmanager":
        # The drill did create a key for its secrets, and that key is scheduled for deletion.
        assert len(drill_keys) == 1, "expected exactly one KMS key of drill %s, found %s" % (run.drill_id, drill_keys)
        assert drill_keys[0]["KeyState"] == "PendingDeletion", drill_keys[0]
    else:
        assert drill_keys == [], "a tmpfs-store drill created KMS keys: %s" % drill_keys
    assert report["teardown"]["remaining"] == 0
    assert drillkit.remaining(drills.world.emu, run.drill_id) == []


def test_remains_lister_finds_planted_leftovers(world):
    """The after-teardown check can fail: leftovers planted under a fake drill id are all listed."""
    drill_id = "dr-selfcheck-" + secrets.token_hex(4)
    s = emulator_session()
    iam, sm, kms = (s.client(n, endpoint_url=world.emu.url) for n in ("iam", "secretsmanager", "kms"))
    tags = [{"Key": TAG, "Value": drill_id}]
    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    doc = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket",
                                                              "Resource": "arn:aws:s3:::x"}]})
    iam.create_role(RoleName="drguard-" + drill_id, Path="/drguard/", AssumeRolePolicyDocument=trust, Tags=tags)
    iam.put_role_policy(RoleName="drguard-" + drill_id, PolicyName="drguard-drill", PolicyDocument=doc)
    policy_arn = iam.create_policy(PolicyName="drguard-%s-extra" % drill_id, PolicyDocument=doc)["Policy"]["Arn"]
    sm.create_secret(Name="drguard/%s/x" % drill_id, SecretString="not a real secret")
    key_id = kms.create_key(Tags=[{"TagKey": TAG, "TagValue": drill_id}])["KeyMetadata"]["KeyId"]
    shm_file = SHM / ("drguard-%s-probe" % drill_id)
    shm_file.write_text("x")
    try:
        remaining, keys = identity_remains(world, drill_id)
        assert {(r["type"], r["id"]) for r in remaining} == {
            ("iam_role", "drguard-" + drill_id), ("iam_policy", policy_arn), ("secret", "drguard/%s/x" % drill_id),
            ("kms_key", key_id), ("tmpfs", str(shm_file))}, remaining
        role = next(r for r in remaining if r["type"] == "iam_role")
        assert role["inline"] == ["drguard-drill"], role
        assert [k["KeyId"] for k in keys] == [key_id]
    finally:
        shm_file.unlink()
        iam.delete_role_policy(RoleName="drguard-" + drill_id, PolicyName="drguard-drill")
        iam.delete_role(RoleName="drguard-" + drill_id)
        iam.delete_policy(PolicyArn=policy_arn)
        sm.delete_secret(SecretId="drguard/%s/x" % drill_id, ForceDeleteWithoutRecovery=True)
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    remaining, keys = identity_remains(world, drill_id)
    assert remaining == [] and [k["KeyState"] for k in keys] == ["PendingDeletion"], (remaining, keys)
