"""verify_artifacts against real files and the emulator's S3/KMS: every failure reason, exactly.

Each hostile case asserts the exact ``reason``, that the trusted state is unchanged, and
(through the ``quarantine`` fixture) that feeding the module's ``failures`` as-is to
quarantine_artifact leaves a quarantine record and a ``drguard.artifact.quarantined`` alert
for every failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime
from datetime import timedelta
from datetime import UTC
from pathlib import Path

import pytest
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils.alerts import read_jsonl
from helpers_artifacts import artifacts_for
from helpers_artifacts import create_kms_key
from helpers_artifacts import create_locked_bucket
from helpers_artifacts import create_versioned_bucket
from helpers_artifacts import generate_key
from helpers_artifacts import KmsKey
from helpers_artifacts import make_statement
from helpers_artifacts import sample_files
from helpers_artifacts import sign_payload
from helpers_artifacts import sign_statement
from helpers_artifacts import throttle_first_calls
from helpers_artifacts import unique
from helpers_artifacts import upload_set
from helpers_artifacts import write_local_set
from helpers_artifacts import write_trust_policy

FAILURE_KEYS = {"name", "reason", "detail", "source", "version_id", "observed_sha256", "observed_size"}
ARTIFACT_KEYS = {"name", "verified", "sha256", "size", "seconds", "reason", "source", "version_id", "kind", "expect"}
SEEDED_STATE = {"some-other-set": {"sequence": 7, "manifest_sha256": "ab" * 32, "accepted_at": "2026-01-01T00:00:00Z"}}


@pytest.fixture(scope="module")
def key():
    return generate_key("ed25519")


class Case:
    """A signed local backup set in a temp dir, with a trust policy and a seeded trusted state."""

    def __init__(self, tmp_path, key, files=None, sequence=10):
        self.tmp = tmp_path
        self.key = key
        self.files = files or sample_files(unique())
        self.root = write_local_set(str(tmp_path / "set"), self.files)
        self.backup_set = unique("set")
        self.sequence = sequence
        self.policy = write_trust_policy(str(tmp_path / "trust.json"), [key])
        self.state = str(tmp_path / "state" / "trusted-state.json")
        os.makedirs(os.path.dirname(self.state))
        with open(self.state, "w") as handle:
            json.dump(SEEDED_STATE, handle)
        self.manifest = str(tmp_path / "manifest.dsse.json")
        self.sign()

    def statement(self, **kwargs):
        return make_statement(kwargs.pop("backup_set", self.backup_set), kwargs.pop("sequence", self.sequence),
                              kwargs.pop("artifacts", artifacts_for(self.files)), **kwargs)

    def sign(self, statement=None, keys=None, path=None, **kwargs):
        data = sign_statement(statement or self.statement(), keys or [self.key], **kwargs)
        return self.write_manifest(data, path)

    def write_manifest(self, data: bytes, path=None):
        with open(path or self.manifest, "wb") as handle:
            handle.write(data)
        return path or self.manifest

    def args(self, **kwargs):
        args = {"manifest": self.manifest, "source": self.root, "trust_policy": self.policy,
                "trusted_state": self.state, "workers": 2}
        args.update(kwargs)
        return args

    def state_bytes(self):
        with open(self.state, "rb") as handle:
            return handle.read()

    def path(self, name):
        return os.path.join(self.root, *name.split("/"))


@pytest.fixture
def case(tmp_path, key):
    return Case(tmp_path, key)


def assert_shape(result):
    for key in ("verified", "failures", "artifacts", "manifest", "bytes_hashed", "trusted_state_updated"):
        assert key in result, key
    for f in result["failures"]:
        assert set(f) == FAILURE_KEYS
        assert f["reason"] in mf.REASONS
    for a in result["artifacts"]:
        assert set(a) == ARTIFACT_KEYS


def assert_fails(result, reason, name=None, case=None, before=None):
    """The task failed with exactly one failure, ``reason`` for ``name``, and the trusted state is unchanged."""
    assert_shape(result)
    assert result.failed, result
    assert result["verified"] is False
    assert result["trusted_state_updated"] is False
    reasons = [(f["name"], f["reason"]) for f in result["failures"]]
    assert reasons == [(name, reason)], reasons  # exactly one failure, no extra findings
    if name is None:  # manifest-level: stopped before reading any artifact byte
        assert result["bytes_hashed"] == 0 and result["artifacts"] == []
    if case is not None:
        assert case.state_bytes() == before
    return [f for f in result["failures"] if f["name"] == name and f["reason"] == reason][0]


QUARANTINED = "drguard.artifact.quarantined"


class Quarantine:
    """``quarantine(result, case)``: feed ``result["failures"]`` as-is to quarantine_artifact.

    Local sources go to a fresh local directory, S3 sources to a fresh Object Lock bucket;
    alerts go to a fresh ``alerts.jsonl``. Then, for every failure: a record exists where
    the module says (file or S3 object under legal hold) with the same name, reason and
    source; exactly one ``drguard.artifact.quarantined`` event names it; a copy exists
    unless nothing could be copied (``artifact_missing``, or ``not_copied`` names). With
    ``case``, the trusted state must still be ``before`` afterwards.
    """

    def __init__(self, runner, tmp_path, aws):
        self.runner, self.tmp, self.aws = runner, tmp_path, aws

    def __call__(self, result, case=None, before=None, not_copied=()):
        failures = result["failures"]
        assert failures, "nothing to quarantine"
        s3_sources = {f["source"].startswith("s3://") for f in failures}
        assert len(s3_sources) == 1, "mixed local and S3 sources"
        s3 = self.aws("s3")
        if s3_sources == {True}:
            where = "s3://%s/drills/" % create_locked_bucket(s3, unique("drguard-qv"))
        else:
            where = str(self.tmp / unique("quarantine"))
        sink = str(self.tmp / unique("out") / "alerts.jsonl")
        drill = unique("dr-va")
        out = self.runner("quarantine_artifact", {"failures": failures, "drill_id": drill, "quarantine": where,
                                                  "alert_sink": {"path": sink}})
        assert not out.failed and out["changed"] is True, out
        assert len(out["records"]) == len(failures)
        events = [e for e in read_jsonl(sink) if e["type"] == QUARANTINED]
        assert len(events) == len(failures) == len(out["alerts"]), events
        for failure, record in zip(failures, out["records"], strict=True):
            what = (failure["name"], failure["reason"])
            assert (record["name"], record["reason"], record["source"]) == what + (failure["source"],)
            stored = self._stored_record(s3, record["record_location"])
            assert (stored["name"], stored["reason"], stored["source"], stored["drill_id"]) == \
                what + (failure["source"], drill)
            assert stored["observed_sha256"] == failure["observed_sha256"]
            matching = [e for e in events if (e["data"]["name"], e["data"]["reason"]) == what]
            assert len(matching) == 1, (what, events)
            assert matching[0]["id"] == record["alert_id"] and matching[0]["drillid"] == drill
            assert matching[0]["data"]["record_location"] == record["record_location"]
            copied = failure["reason"] != "artifact_missing" and failure["name"] not in not_copied
            assert record["copied"] is copied, record
            if copied:
                self._assert_exists(s3, record["quarantine_location"])
        if case is not None:
            assert case.state_bytes() == before
        return out

    @staticmethod
    def _s3_parts(location):
        bucket, _, key = location[len("s3://"):].partition("/")
        key, _, version = key.partition("?versionId=")
        return bucket, key, version or None

    def _stored_record(self, s3, location):
        if location.startswith("s3://"):
            bucket, key, _ = self._s3_parts(location)
            assert s3.get_object_legal_hold(Bucket=bucket, Key=key)["LegalHold"]["Status"] == "ON"
            return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert os.path.isfile(location), location
        return json.loads(Path(location).read_text())

    def _assert_exists(self, s3, location):
        if location.startswith("s3://"):
            bucket, key, version = self._s3_parts(location)
            kwargs = {"VersionId": version} if version else {}
            head = s3.head_object(Bucket=bucket, Key=key, **kwargs)
            assert head["ObjectLockLegalHoldStatus"] == "ON"
        else:
            assert os.path.isfile(location), location


@pytest.fixture
def quarantine(module_runner, tmp_path, aws):
    return Quarantine(module_runner, tmp_path, aws)


# ----------------------------------------------------------------------------- success

def test_local_success_updates_trusted_state_once(module_runner, case):
    result = module_runner("verify_artifacts", case.args())
    assert_shape(result)
    assert not result.failed, result
    assert result["verified"] is True and result["failures"] == []
    assert result["changed"] is True and result["trusted_state_updated"] is True
    assert result["bytes_hashed"] == sum(len(b) for b in case.files.values())
    by_name = {a["name"]: a for a in result["artifacts"]}
    assert set(by_name) == set(case.files)
    for name, body in case.files.items():
        a = by_name[name]
        assert a["verified"] is True and a["reason"] is None
        assert a["sha256"] == hashlib.sha256(body).hexdigest() and a["size"] == len(body)
        assert a["source"] == case.path(name) and a["version_id"] is None
    m = result["manifest"]
    with open(case.manifest, "rb") as handle:
        envelope = handle.read()
    assert m["sha256"] == hashlib.sha256(envelope).hexdigest()
    assert m["keyids"] == [case.key.keyid]
    assert (m["backup_set"], m["sequence"]) == (case.backup_set, case.sequence)
    state = json.loads(case.state_bytes())
    assert state["some-other-set"] == SEEDED_STATE["some-other-set"]
    assert state[case.backup_set]["sequence"] == case.sequence
    assert state[case.backup_set]["manifest_sha256"] == m["sha256"]
    assert state[case.backup_set]["accepted_at"].endswith("Z")

    again = module_runner("verify_artifacts", case.args())
    assert again["verified"] is True and again["trusted_state_updated"] is False and again["changed"] is False


def test_check_mode_verifies_fully_but_never_updates_state(module_runner, case, quarantine):
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args(), check_mode=True)
    assert result["verified"] is True and result["trusted_state_updated"] is False
    assert result["changed"] is True  # it would have recorded the manifest
    assert result["bytes_hashed"] == sum(len(b) for b in case.files.values())
    assert case.state_bytes() == before
    # and a failure in check mode is still a failure
    with open(case.path("files.tar"), "r+b") as handle:
        handle.seek(3)
        byte = handle.read(1)
        handle.seek(3)
        handle.write(bytes([byte[0] ^ 1]))
    failed = module_runner("verify_artifacts", case.args(), check_mode=True)
    assert_fails(failed, "digest_mismatch", "files.tar", case, before)
    quarantine(failed, case, before)


def test_no_trusted_state_is_optional(module_runner, case):
    result = module_runner("verify_artifacts", case.args(trusted_state=None))
    assert result["verified"] is True and result["trusted_state_updated"] is False


def test_first_verification_creates_the_state_file(module_runner, case, tmp_path):
    state = str(tmp_path / "new" / "state.json")
    result = module_runner("verify_artifacts", case.args(trusted_state=state))
    assert result["trusted_state_updated"] is True
    assert json.loads(Path(state).read_text())[case.backup_set]["sequence"] == case.sequence


# ----------------------------------------------------------------------------- artifact tampering (local)

def _flip(path, offset=10):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_flipped_byte_is_digest_mismatch(module_runner, case, quarantine):
    before = case.state_bytes()
    _flip(case.path("orders.sqlite"), 100)
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "digest_mismatch", "orders.sqlite", case, before)
    with open(case.path("orders.sqlite"), "rb") as handle:
        assert f["observed_sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert f["observed_size"] == len(case.files["orders.sqlite"])
    assert f["source"] == case.path("orders.sqlite") and f["version_id"] is None
    ok = {a["name"]: a["verified"] for a in result["artifacts"]}
    assert ok == {"orders.sqlite": False, "files.tar": True, "logs/app.log": True}
    quarantine(result, case, before)


def test_truncated_is_size_mismatch(module_runner, case, quarantine):
    before = case.state_bytes()
    with open(case.path("files.tar"), "r+b") as handle:
        handle.truncate(100)
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "size_mismatch", "files.tar", case, before)
    assert f["observed_size"] == 100
    quarantine(result, case, before)


def test_extended_past_signed_size_is_size_mismatch(module_runner, case, quarantine):
    before = case.state_bytes()
    with open(case.path("logs/app.log"), "ab") as handle:
        handle.write(b"appended\n")
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "size_mismatch", "logs/app.log", case, before)
    assert f["observed_size"] == len(case.files["logs/app.log"]) + 9
    quarantine(result, case, before)


def test_missing_is_artifact_missing(module_runner, case, quarantine):
    before = case.state_bytes()
    os.unlink(case.path("files.tar"))
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "artifact_missing", "files.tar", case, before)
    quarantine(result, case, before)  # a record and an alert, nothing to copy


def test_unlisted_extra_object_strict_and_not_strict(module_runner, case, quarantine):
    before = case.state_bytes()
    write_local_set(case.root, {"extra/evil.bin": b"not in the manifest"})
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "unlisted_artifact", "extra/evil.bin", case, before)
    assert f["source"] == case.path("extra/evil.bin") and f["observed_size"] == 19
    assert module_runner("verify_artifacts", case.args(strict=False))["verified"] is True
    quarantine(result)
    assert not os.path.exists(case.path("extra/evil.bin"))  # moved into quarantine


def test_manifest_inside_the_source_is_not_unlisted(module_runner, case):
    inside = os.path.join(case.root, "manifest.dsse.json")
    case.sign(path=inside)
    assert module_runner("verify_artifacts", case.args(manifest=inside))["verified"] is True


def test_symlink_escaping_the_source_is_refused(module_runner, case, tmp_path, quarantine):
    before = case.state_bytes()
    outside = tmp_path / "outside.tar"
    outside.write_bytes(case.files["files.tar"])
    os.unlink(case.path("files.tar"))
    os.symlink(str(outside), case.path("files.tar"))
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "unsafe_name", "files.tar", case, before)
    assert "outside" in f["detail"]
    # recorded and alerted, but the symlink is never followed or moved
    quarantine(result, case, before, not_copied={"files.tar"})
    assert os.path.islink(case.path("files.tar")) and outside.read_bytes() == case.files["files.tar"]


def test_metadata_mode_reads_no_object_body(module_runner, case, quarantine):
    # Same size, different bytes: only reading the body could notice.
    _flip(case.path("orders.sqlite"), 200)
    result = module_runner("verify_artifacts", case.args(mode="metadata", trusted_state=None))
    assert result["verified"] is True and result["bytes_hashed"] == 0
    # ...while sizes are still checked
    with open(case.path("files.tar"), "ab") as handle:
        handle.write(b"x")
    bad = module_runner("verify_artifacts", case.args(mode="metadata", trusted_state=None))
    assert_fails(bad, "size_mismatch", "files.tar")
    assert bad["bytes_hashed"] == 0
    quarantine(bad)


def test_workers_give_the_same_results(module_runner, tmp_path, key, quarantine):
    files = {"f%03d.bin" % i: os.urandom(1000 + i) for i in range(40)}
    case = Case(tmp_path, key, files=files)
    _flip(case.path("f007.bin"))
    os.unlink(case.path("f020.bin"))
    with open(case.path("f033.bin"), "ab") as handle:
        handle.write(b"!")

    def strip(result):
        return ([{k: v for k, v in a.items() if k != "seconds"} for a in result["artifacts"]],
                sorted(result["failures"], key=lambda f: f["name"]), result["bytes_hashed"])

    one = module_runner("verify_artifacts", case.args(workers=1))
    many = module_runner("verify_artifacts", case.args(workers=8))
    assert strip(one) == strip(many)
    assert sorted((f["name"], f["reason"]) for f in one["failures"]) == [
        ("f007.bin", "digest_mismatch"), ("f020.bin", "artifact_missing"), ("f033.bin", "size_mismatch")]
    quarantine(one)


# ----------------------------------------------------------------------------- signatures and trust

def test_untrusted_key(module_runner, case, quarantine):
    before = case.state_bytes()
    case.sign(keys=[generate_key("ed25519")])
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "untrusted_key", None, case, before)
    assert f["source"] == case.manifest
    assert module_runner("verify_artifacts", case.args())["artifacts"] == []
    quarantine(result, case, before)
    assert not os.path.exists(case.manifest)  # the manifest itself is the evidence


def test_a_modules_warnings_reach_its_result_after_controller_code_was_imported(module_runner, case, quarantine):
    """The harness runs modules as their own process would: once controller code is imported (some tests do),
    ansible-core would otherwise print a module's warnings on the controller's display and leave them out of its
    result (the full suite lost this test's neighbour's warning that way)."""
    import ansible.errors  # noqa: F401, PLC0415 - the import flips the process into controller mode
    write_trust_policy(case.policy, [case.key, case.key], threshold=2)
    result = module_runner("verify_artifacts", case.args())
    assert "can never be met" in json.dumps(result.get("warnings", []))


def test_threshold_two_not_met_by_one_key_listed_twice(module_runner, case, quarantine):
    before = case.state_bytes()
    write_trust_policy(case.policy, [case.key, case.key], threshold=2)
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "threshold_not_met", None, case, before)
    assert "can never be met" in json.dumps(result.get("warnings", []))
    quarantine(result, case, before)


def test_threshold_two_not_met_by_one_key_signing_twice(module_runner, case, quarantine):
    before = case.state_bytes()
    other = generate_key("ecdsa")
    write_trust_policy(case.policy, [case.key, other], threshold=2)
    case.sign(keys=[case.key, case.key])
    failed = module_runner("verify_artifacts", case.args())
    assert_fails(failed, "threshold_not_met", None, case, before)
    quarantine(failed, case, before)  # moves the failing manifest away; a good one is signed next
    case.sign(keys=[case.key, other])
    result = module_runner("verify_artifacts", case.args())
    assert result["verified"] is True
    assert sorted(result["manifest"]["keyids"]) == sorted([case.key.keyid, other.keyid])


def test_threshold_two_not_met_by_one_key_signing_with_and_without_keyid(module_runner, case, quarantine):
    """The empty keyid is tried against every trusted key; the key it finds was already counted."""
    before = case.state_bytes()
    write_trust_policy(case.policy, [case.key, generate_key("ecdsa")], threshold=2)
    case.sign(keys=[case.key, case.key], keyids=[case.key.keyid, ""])
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "threshold_not_met", None, case, before)
    assert f["detail"] == "1 distinct trusted key(s) signed (%s); the trust policy requires 2" % case.key.keyid
    quarantine(result, case, before)


def test_rsa_pkcs1v15_signature_for_a_pss_key(module_runner, case, quarantine):
    rsa_key = generate_key("rsa")
    write_trust_policy(case.policy, [rsa_key])
    payload = mf.encode_statement(case.statement())
    message = mf.pae(mf.PAYLOAD_TYPE, payload)
    case.write_manifest(sign_payload(payload, [rsa_key], signatures=[rsa_key.sign_pkcs1v15(message)]))
    before = case.state_bytes()
    failed = module_runner("verify_artifacts", case.args())
    assert_fails(failed, "signature_invalid", None, case, before)
    quarantine(failed, case, before)
    case.write_manifest(sign_payload(payload, [rsa_key]))
    assert module_runner("verify_artifacts", case.args())["verified"] is True


def test_ed25519_signature_offered_for_an_ecdsa_key(module_runner, case, quarantine):
    ecdsa_key = generate_key("ecdsa")
    write_trust_policy(case.policy, [ecdsa_key])
    payload = mf.encode_statement(case.statement())
    message = mf.pae(mf.PAYLOAD_TYPE, payload)
    case.write_manifest(sign_payload(payload, [ecdsa_key], signatures=[case.key.sign(message)]))
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "signature_invalid", None, case, before)
    quarantine(result, case, before)


def test_subject_copied_from_another_backup_sets_manifest(module_runner, case, tmp_path, quarantine):
    """Decision (docs/manifest.md): an edited signed payload is signature_invalid; a manifest
    *signed* with another set's digests is digest_mismatch on every artifact it misdescribes."""
    before = case.state_bytes()
    other_files = sample_files(unique("other"))
    other = case.statement(artifacts=artifacts_for(other_files))
    mine = case.statement()
    signed = json.loads(sign_statement(mine, [case.key]))
    forged = dict(mine, subject=other["subject"])
    forged["predicate"] = dict(mine["predicate"], artifacts=other["predicate"]["artifacts"])
    signed["payload"] = base64.b64encode(mf.encode_statement(forged)).decode()
    case.write_manifest(json.dumps(signed).encode())
    forged_result = module_runner("verify_artifacts", case.args())
    assert_fails(forged_result, "signature_invalid", None, case, before)
    quarantine(forged_result, case, before)

    # A trusted producer that signs the wrong subject: caught by the digests.
    wrong = case.statement(artifacts=[mf.Artifact(a.name, b.sha256, a.size, a.kind, None) for a, b in
                                      zip(artifacts_for(case.files), artifacts_for(other_files), strict=True)])
    case.sign(wrong)
    result = module_runner("verify_artifacts", case.args())
    assert result.failed and result["verified"] is False
    differ = sorted(a.name for a, b in zip(artifacts_for(case.files), artifacts_for(other_files), strict=True)
                    if a.sha256 != b.sha256)
    assert differ and sorted((f["name"], f["reason"]) for f in result["failures"]) == \
        [(n, "digest_mismatch") for n in differ]
    assert case.state_bytes() == before
    quarantine(result, case, before)


# ----------------------------------------------------------------------------- freshness and rollback

def test_expired_manifest(module_runner, case, quarantine):
    before = case.state_bytes()
    now = datetime.now(UTC)
    case.sign(case.statement(created_at=now - timedelta(days=3), expires_at=now - timedelta(seconds=5)))
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "manifest_expired", None, case, before)
    assert f["source"] == case.manifest and f["observed_sha256"] is None
    quarantine(result, case, before)


def test_stale_backup(module_runner, case, quarantine):
    before = case.state_bytes()
    case.sign(case.statement(created_at=datetime.now(UTC) - timedelta(hours=2)))
    result = module_runner("verify_artifacts", case.args(max_age=3600))
    assert_fails(result, "stale_backup", None, case, before)
    assert module_runner("verify_artifacts", case.args(max_age=3 * 3600))["verified"] is True
    quarantine(result)


def test_created_in_the_future_is_malformed_beyond_the_clock_skew(module_runner, case, quarantine):
    """A manifest from the future would pass max_age and report an RPO of 0."""
    before = case.state_bytes()
    now = datetime.now(UTC)
    case.sign(case.statement(created_at=now + timedelta(hours=1), expires_at=now + timedelta(days=1)))
    result = module_runner("verify_artifacts", case.args(max_age=3600))
    f = assert_fails(result, "manifest_malformed", None, case, before)
    assert "in the future, beyond the allowed clock skew of 300 s" in f["detail"]
    quarantine(result, case, before)
    case.sign(case.statement(created_at=now + timedelta(seconds=60), expires_at=now + timedelta(days=1)))
    assert module_runner("verify_artifacts", case.args(max_age=3600))["verified"] is True
    case.sign(case.statement(created_at=now + timedelta(seconds=600), expires_at=now + timedelta(days=1)))
    assert module_runner("verify_artifacts", case.args(trusted_state=None, max_clock_skew=3600))["verified"] is True


def test_expected_backup_set_other_than_the_manifests(module_runner, case, quarantine):
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args(expected_backup_set="payments-db"))
    f = assert_fails(result, "manifest_malformed", None, case, before)
    assert f["detail"] == ("the manifest is for backup set %r, but backup set 'payments-db' is expected"
                           % case.backup_set)
    quarantine(result, case, before)
    case.sign()
    ok = module_runner("verify_artifacts", case.args(expected_backup_set=case.backup_set))
    assert ok["verified"] is True and ok["failures"] == []


def test_update_trusted_state_false_checks_rollback_but_never_writes(module_runner, case, quarantine):
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args(update_trusted_state=False))
    assert not result.failed and result["verified"] is True and result["failures"] == []
    assert result["trusted_state_updated"] is False and result["changed"] is False
    assert case.state_bytes() == before
    # what the controller records afterwards
    assert (result["manifest"]["backup_set"], result["manifest"]["sequence"]) == (case.backup_set, case.sequence)
    assert module_runner("verify_artifacts", case.args())["trusted_state_updated"] is True
    before = case.state_bytes()
    case.sign(case.statement(sequence=case.sequence - 1))
    refused = module_runner("verify_artifacts", case.args(update_trusted_state=False))
    assert_fails(refused, "rollback", None, case, before)
    quarantine(refused, case, before)


def test_rollback_lower_sequence(module_runner, case, quarantine):
    assert module_runner("verify_artifacts", case.args())["trusted_state_updated"] is True
    before = case.state_bytes()
    case.sign(case.statement(sequence=case.sequence - 1))
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "rollback", None, case, before)
    assert "lower" in f["detail"]
    quarantine(result, case, before)


def test_equivocation_same_sequence_different_manifest(module_runner, case, quarantine):
    assert module_runner("verify_artifacts", case.args())["trusted_state_updated"] is True
    before = case.state_bytes()
    case.sign(case.statement(tier="tier-2"))
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "rollback", None, case, before)
    assert "equivocation" in f["detail"]
    quarantine(result, case, before)


def test_higher_sequence_is_accepted_and_recorded(module_runner, case):
    assert module_runner("verify_artifacts", case.args())["trusted_state_updated"] is True
    case.sign(case.statement(sequence=case.sequence + 5))
    result = module_runner("verify_artifacts", case.args())
    assert result["trusted_state_updated"] is True
    assert json.loads(case.state_bytes())[case.backup_set]["sequence"] == case.sequence + 5


def test_cosignature_added_later_is_not_equivocation(module_runner, case):
    payload = mf.encode_statement(case.statement())
    case.write_manifest(sign_payload(payload, [case.key]))
    assert module_runner("verify_artifacts", case.args())["trusted_state_updated"] is True
    second = generate_key("ecdsa")
    write_trust_policy(case.policy, [case.key, second], threshold=1)
    case.write_manifest(sign_payload(payload, [case.key, second]))
    assert module_runner("verify_artifacts", case.args())["verified"] is True


def test_corrupt_trusted_state_fails_closed(module_runner, case):
    with open(case.state, "w") as handle:
        handle.write("{not json")
    result = module_runner("verify_artifacts", case.args())
    assert result.failed and result["verified"] is False and result["trusted_state_updated"] is False
    assert result["failures"] == [] and result["artifacts"] == []
    assert result["msg"].startswith("The trusted state %s is not valid: the trusted state is not valid JSON"
                                    % case.state), result["msg"]


# ----------------------------------------------------------------------------- names and schema

@pytest.mark.parametrize("bad", ["../x", "/abs", "a\\b", "a\x00b", "dir/../../x", "./x"])
def test_unsafe_names(module_runner, case, bad, quarantine):
    before = case.state_bytes()
    arts = artifacts_for(case.files) + [mf.Artifact(bad, "0" * 64, 1, "raw", None)]
    case.sign(case.statement(artifacts=arts))
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "unsafe_name", bad, case, before)
    assert f["source"] == case.manifest
    entry = [a for a in result["artifacts"] if a["name"] == bad][0]
    assert entry["verified"] is False and entry["reason"] == "unsafe_name"
    # the safe artifacts were verified; nothing was read for the unsafe one
    assert result["bytes_hashed"] == sum(len(b) for b in case.files.values())
    out = quarantine(result, case, before)
    # the copy is the manifest that lists the name, kept beside the record, never at a path made of the name
    copy = out["records"][0]["quarantine_location"]
    assert os.path.basename(copy) == "@manifest" and os.path.dirname(out["records"][0]["record_location"]) == \
        os.path.dirname(copy)


def test_unknown_predicate_field(module_runner, case, quarantine):
    before = case.state_bytes()
    statement = case.statement()
    statement["predicate"]["retention"] = "forever"
    case.sign(statement)
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "manifest_malformed", None, case, before)
    assert "retention" in f["detail"]
    quarantine(result, case, before)


def test_duplicate_json_key_in_statement(module_runner, case, quarantine):
    before = case.state_bytes()
    payload = mf.encode_statement(case.statement())
    dup = payload.replace(b'"sequence":%d' % case.sequence, b'"sequence":%d,"sequence":99' % case.sequence)
    assert dup != payload
    case.write_manifest(sign_payload(dup, [case.key]))
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "manifest_malformed", None, case, before)
    assert "duplicate" in f["detail"]
    quarantine(result, case, before)


def test_duplicate_json_key_in_envelope(module_runner, case, quarantine):
    before = case.state_bytes()
    good = case.sign()
    text = Path(good).read_text()
    text = text.replace('"payloadType": "%s",' % mf.PAYLOAD_TYPE,
                        '"payloadType": "%s", "payloadType": "text/plain",' % mf.PAYLOAD_TYPE, 1)
    case.write_manifest(text.encode())
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "manifest_malformed", None, case, before)
    quarantine(result, case, before)


def test_subject_without_artifacts_entry(module_runner, case, quarantine):
    before = case.state_bytes()
    statement = case.statement()
    del statement["predicate"]["artifacts"]["files.tar"]
    case.sign(statement)
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "manifest_malformed", None, case, before)
    quarantine(result, case, before)


def test_not_an_envelope(module_runner, case, quarantine):
    before = case.state_bytes()
    case.write_manifest(b"just some text")
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "manifest_malformed", None, case, before)
    quarantine(result, case, before)


def test_bad_inputs_fail_with_a_message(module_runner, case, tmp_path):
    nope = str(tmp_path / "nope.json")
    missing = module_runner("verify_artifacts", case.args(manifest=nope))
    assert missing.failed and missing["verified"] is False and missing["failures"] == []
    assert missing["msg"] == "Cannot read the manifest %s: No such file or directory" % nope
    bad_policy = tmp_path / "bad-policy.json"
    bad_policy.write_text('{"threshold": 0, "keys": []}')
    policy = module_runner("verify_artifacts", case.args(trust_policy=str(bad_policy)))
    assert policy.failed and policy["verified"] is False and policy["failures"] == []
    assert policy["msg"] == "Trust policy threshold must be an integer >= 1"
    prefix = module_runner("verify_artifacts", case.args(source="s3://bucket/no-slash"))
    assert prefix.failed and prefix["verified"] is False and prefix["failures"] == []
    assert prefix["msg"] == ("Source 's3://bucket/no-slash': end the prefix with '/' so that 'no-slash' does not "
                             "also match 'no-slash0/'")


# ----------------------------------------------------------------------------- S3 (moto)

class S3Case(Case):
    """A backup set in a versioned Object Lock bucket, manifest in S3, trusted state in S3."""

    def __init__(self, tmp_path, key, s3, lock_mode="COMPLIANCE", files=None, bucket=None):
        self.s3 = s3
        self.bucket = bucket or (create_locked_bucket(s3, mode=lock_mode) if lock_mode is not False
                                 else create_versioned_bucket(s3))
        self.prefix = unique("set") + "/"
        self.versions = {}
        super().__init__(tmp_path, key, files=files)
        self.state_key = "state/%s.json" % unique("trusted")
        s3.put_object(Bucket=self.bucket, Key=self.state_key, Body=json.dumps(SEEDED_STATE).encode(),
                      ChecksumAlgorithm="SHA256")

    def sign(self, statement=None, keys=None, path=None, **kwargs):
        if not self.versions:
            self.versions = upload_set(self.s3, self.bucket, self.prefix, self.files)
        data = sign_statement(statement or self.statement(), keys or [self.key], **kwargs)
        return self.write_manifest(data)

    def statement(self, **kwargs):
        kwargs.setdefault("artifacts", artifacts_for(self.files, self.versions))
        return super().statement(**kwargs)

    def write_manifest(self, data: bytes, path=None):
        resp = self.s3.put_object(Bucket=self.bucket, Key="manifests/%s.dsse.json" % self.prefix.strip("/"),
                                  Body=data, ChecksumAlgorithm="SHA256")
        self.manifest = "s3://%s/manifests/%s.dsse.json" % (self.bucket, self.prefix.strip("/"))
        self.manifest_version = resp.get("VersionId")
        return self.manifest

    def args(self, **kwargs):
        args = {"manifest": self.manifest, "source": "s3://%s/%s" % (self.bucket, self.prefix),
                "trust_policy": self.policy, "trusted_state": "s3://%s/%s" % (self.bucket, self.state_key),
                "workers": 4}
        args.update(kwargs)
        return args

    def state_bytes(self):
        return self.s3.get_object(Bucket=self.bucket, Key=self.state_key)["Body"].read()

    def uri(self, name, version=None):
        version = version or self.versions[name]
        return "s3://%s/%s%s?versionId=%s" % (self.bucket, self.prefix, name, version)


@pytest.fixture
def s3(aws):
    return aws("s3")


@pytest.fixture
def s3case(tmp_path, key, s3):
    return S3Case(tmp_path, key, s3)


def test_s3_success_pins_versions_and_updates_state(module_runner, s3case):
    result = module_runner("verify_artifacts", s3case.args())
    assert_shape(result)
    assert result["verified"] is True, result
    for a in result["artifacts"]:
        assert a["version_id"] == s3case.versions[a["name"]]
        assert a["source"] == s3case.uri(a["name"])
    assert result["manifest"]["location"] == s3case.manifest + "?versionId=" + s3case.manifest_version
    assert result["trusted_state_updated"] is True
    state = json.loads(s3case.state_bytes())
    assert state[s3case.backup_set]["manifest_sha256"] == result["manifest"]["sha256"]
    assert state["some-other-set"] == SEEDED_STATE["some-other-set"]


def test_s3_check_mode_leaves_state_unchanged(module_runner, s3case):
    before = s3case.state_bytes()
    result = module_runner("verify_artifacts", s3case.args(), check_mode=True)
    assert result["verified"] is True and result["trusted_state_updated"] is False
    assert s3case.state_bytes() == before


def test_s3_trusted_state_created_when_missing(module_runner, s3case):
    key = "state/%s.json" % unique("fresh")
    result = module_runner("verify_artifacts", s3case.args(trusted_state="s3://%s/%s" % (s3case.bucket, key)))
    assert result["trusted_state_updated"] is True
    body = json.loads(s3case.s3.get_object(Bucket=s3case.bucket, Key=key)["Body"].read())
    assert body[s3case.backup_set]["sequence"] == s3case.sequence


def test_s3_throttled_calls_are_retried(module_runner, s3case, monkeypatch):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _aws
    monkeypatch.setattr(_aws, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(_aws, "RETRY_MAX_DELAY", 0.02)
    with throttle_first_calls(s3case.bucket) as throttled:
        result = module_runner("verify_artifacts", s3case.args())
    assert result["verified"] is True, result["msg"]
    # the manifest and state reads, every artifact's HEAD and GET, the strict listing, the state write
    assert sorted(throttled) == ["GetObject", "HeadObject", "ListObjectsV2", "PutObject"]
    assert result["trusted_state_updated"] is True and result["failures"] == []


def test_s3_newer_version_shadowing_the_pinned_one_is_ignored(module_runner, s3case):
    s3case.s3.put_object(Bucket=s3case.bucket, Key=s3case.prefix + "files.tar", Body=b"evil newer version",
                         ChecksumAlgorithm="SHA256")
    result = module_runner("verify_artifacts", s3case.args())
    assert result["verified"] is True, result["failures"]
    tar = [a for a in result["artifacts"] if a["name"] == "files.tar"][0]
    assert tar["source"] == s3case.uri("files.tar")


def test_s3_delete_marker_on_top_is_fine(module_runner, s3case):
    s3case.s3.delete_object(Bucket=s3case.bucket, Key=s3case.prefix + "orders.sqlite")
    result = module_runner("verify_artifacts", s3case.args())
    assert result["verified"] is True, result["failures"]


def test_s3_pinned_version_that_does_not_exist(module_runner, tmp_path, key, s3, quarantine):
    case = S3Case(tmp_path, key, s3, lock_mode=False)
    before = case.state_bytes()
    s3.delete_object(Bucket=case.bucket, Key=case.prefix + "files.tar", VersionId=case.versions["files.tar"])
    result = module_runner("verify_artifacts", case.args(require_object_lock="none"))
    f = assert_fails(result, "artifact_missing", "files.tar", case, before)
    assert f["source"] == case.uri("files.tar") and f["version_id"] == case.versions["files.tar"]
    out = quarantine(result, case, before)
    assert out["records"][0]["original"] == "missing"


def test_s3_flipped_byte_is_digest_mismatch(module_runner, s3case, quarantine):
    body = bytearray(s3case.files["files.tar"])
    body[50] ^= 1
    tampered = s3case.s3.put_object(Bucket=s3case.bucket, Key=s3case.prefix + "files.tar", Body=bytes(body),
                                    ChecksumAlgorithm="SHA256")["VersionId"]
    s3case.versions["files.tar"] = tampered
    s3case.sign()
    before = s3case.state_bytes()
    result = module_runner("verify_artifacts", s3case.args())
    # the store's whole-object SHA-256 also disagrees: one failure, the most serious reason
    f = assert_fails(result, "digest_mismatch", "files.tar", s3case, before)
    assert f["source"] == s3case.uri("files.tar", tampered)
    assert f["observed_sha256"] == hashlib.sha256(bytes(body)).hexdigest()
    assert "ChecksumSHA256" in f["detail"]
    out = quarantine(result, s3case, before)
    # the exact tampered version was preserved, not whatever is current
    copy = out["records"][0]["quarantine_location"]
    bucket, key, version = Quarantine._s3_parts(copy)
    assert s3case.s3.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read() == bytes(body)


def test_s3_extended_object_is_size_mismatch(module_runner, s3case, quarantine):
    longer = s3case.files["logs/app.log"] + b"x" * 5000
    s3case.versions["logs/app.log"] = s3case.s3.put_object(
        Bucket=s3case.bucket, Key=s3case.prefix + "logs/app.log", Body=longer, ChecksumAlgorithm="SHA256")["VersionId"]
    s3case.sign()
    before = s3case.state_bytes()
    result = module_runner("verify_artifacts", s3case.args())
    f = assert_fails(result, "size_mismatch", "logs/app.log", s3case, before)
    assert f["observed_size"] == len(longer)
    quarantine(result, s3case, before)


def test_s3_unlisted_object(module_runner, s3case, quarantine):
    before = s3case.state_bytes()
    extra = s3case.s3.put_object(Bucket=s3case.bucket, Key=s3case.prefix + "extra.bin", Body=b"x",
                                 ChecksumAlgorithm="SHA256")["VersionId"]
    result = module_runner("verify_artifacts", s3case.args())
    f = assert_fails(result, "unlisted_artifact", "extra.bin", s3case, before)
    quarantine(result, s3case, before)
    assert f["source"] == "s3://%s/%sextra.bin?versionId=%s" % (s3case.bucket, s3case.prefix, extra)
    assert f["version_id"] == extra


def _multipart(s3, bucket, key, body, checksum_type=None):
    kwargs = {"ChecksumType": checksum_type} if checksum_type else {}
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", **kwargs)
    parts, size = [], 5 * 1024 * 1024
    for number, start in enumerate(range(0, len(body), size), 1):
        part = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                              Body=body[start:start + size], ChecksumAlgorithm="SHA256")
        parts.append({"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]})
    done = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                        MultipartUpload={"Parts": parts})
    # moto applies neither the bucket's default retention nor the upload's lock headers to a
    # multipart object (AWS does); set the retention explicitly, as AWS also allows.
    s3.put_object_retention(Bucket=bucket, Key=key, VersionId=done["VersionId"], Retention={
        "Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(days=1)})
    return done["VersionId"]


@pytest.mark.parametrize("checksum_type", [None, "COMPOSITE"])
def test_s3_composite_multipart_checksum_is_not_compared(module_runner, tmp_path, key, s3, checksum_type,
                                                         quarantine):
    big = os.urandom(5 * 1024 * 1024 + 1000)
    case = S3Case(tmp_path, key, s3, files={"big.bin": big})
    case.versions["big.bin"] = _multipart(s3, case.bucket, case.prefix + "big.bin", big, checksum_type)
    head = s3.head_object(Bucket=case.bucket, Key=case.prefix + "big.bin", ChecksumMode="ENABLED")
    stored = base64.b64decode(head["ChecksumSHA256"].split("-")[0]).hex()
    assert stored != hashlib.sha256(big).hexdigest()  # it really is not the file's SHA-256
    case.sign()
    result = module_runner("verify_artifacts", case.args(trusted_state=None))
    assert result["verified"] is True, result["failures"]
    assert result["bytes_hashed"] == len(big)

    # A tampered body behind a composite checksum is still caught by the streamed digest.
    evil = bytearray(big)
    evil[-10] ^= 1
    case.versions["big.bin"] = _multipart(s3, case.bucket, case.prefix + "big.bin", bytes(evil), checksum_type)
    case.sign(case.statement(artifacts=[mf.Artifact("big.bin", hashlib.sha256(big).hexdigest(), len(big), "raw",
                                                    case.versions["big.bin"])]))
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "digest_mismatch", "big.bin", case, before)
    assert f["observed_sha256"] == hashlib.sha256(bytes(evil)).hexdigest()
    quarantine(result, case, before)


def test_s3_governance_lock_when_compliance_is_required(module_runner, tmp_path, key, s3, quarantine):
    case = S3Case(tmp_path, key, s3, lock_mode="GOVERNANCE")
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args())
    assert result.failed and result["verified"] is False
    assert sorted((f["name"], f["reason"]) for f in result["failures"]) == \
        [(n, "not_immutable") for n in sorted(case.files)]
    assert case.state_bytes() == before
    quarantine(result, case, before)
    ok = module_runner("verify_artifacts", case.args(require_object_lock="governance"))
    assert ok["verified"] is True, ok["failures"]


def test_s3_expired_retention(module_runner, tmp_path, key, s3, quarantine):
    case = S3Case(tmp_path, key, s3, lock_mode=None)
    past = datetime.now(UTC) - timedelta(days=1)
    name = "files.tar"
    case.versions[name] = s3.put_object(Bucket=case.bucket, Key=case.prefix + name, Body=case.files[name],
                                        ChecksumAlgorithm="SHA256", ObjectLockMode="COMPLIANCE",
                                        ObjectLockRetainUntilDate=past)["VersionId"]
    for other in ("orders.sqlite", "logs/app.log"):
        case.versions[other] = s3.put_object(
            Bucket=case.bucket, Key=case.prefix + other, Body=case.files[other], ChecksumAlgorithm="SHA256",
            ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=datetime.now(UTC) + timedelta(days=1))["VersionId"]
    case.sign()
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args())
    f = assert_fails(result, "not_immutable", name, case, before)
    assert "expired" in f["detail"]
    quarantine(result, case, before)


def test_s3_no_lock_at_all(module_runner, tmp_path, key, s3, quarantine):
    case = S3Case(tmp_path, key, s3, lock_mode=False)
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args())
    assert result.failed and result["verified"] is False
    assert sorted((f["name"], f["reason"]) for f in result["failures"]) == \
        [(n, "not_immutable") for n in sorted(case.files)]
    assert case.state_bytes() == before
    quarantine(result, case, before)
    assert module_runner("verify_artifacts", case.args(require_object_lock="none"))["verified"] is True


def test_s3_metadata_mode_reads_no_body_but_compares_store_checksums(module_runner, s3case, quarantine):
    result = module_runner("verify_artifacts", s3case.args(mode="metadata", trusted_state=None))
    assert result["verified"] is True and result["bytes_hashed"] == 0
    wrong = [mf.Artifact(a.name, "0" * 64 if a.name == "files.tar" else a.sha256, a.size, a.kind, a.version_id)
             for a in artifacts_for(s3case.files, s3case.versions)]
    s3case.sign(s3case.statement(artifacts=wrong))
    bad = module_runner("verify_artifacts", s3case.args(mode="metadata", trusted_state=None))
    assert_fails(bad, "metadata_mismatch", "files.tar")
    assert bad["bytes_hashed"] == 0
    quarantine(bad)


def test_s3_manifest_pinned_by_version(module_runner, s3case):
    pinned = s3case.manifest + "?versionId=" + s3case.manifest_version
    s3case.write_manifest(b"overwritten by an attacker")
    result = module_runner("verify_artifacts", s3case.args(manifest=pinned, trusted_state=None))
    assert result["verified"] is True, result


@pytest.mark.parametrize("spec", ["RSA_2048", "ECC_NIST_P256"])
def test_kms_trust_policy(module_runner, tmp_path, key, s3, aws, spec, quarantine):
    kms = aws("kms")
    kms_key = KmsKey(kms, create_kms_key(kms, spec)["Arn"])
    case = S3Case(tmp_path, key, s3)
    write_trust_policy(case.policy, [kms_key])
    case.sign(keys=[kms_key])
    result = module_runner("verify_artifacts", case.args())
    assert result["verified"] is True, result
    assert result["manifest"]["keyids"] == [kms_key.keyid]
    case.sign(keys=[key])
    before = case.state_bytes()
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "untrusted_key", None, case, before)
    quarantine(result, case, before)


def test_empty_artifacts_local_and_s3(module_runner, tmp_path, key, s3, quarantine):
    files = {"empty.bin": b"", "one.bin": b"1"}
    (tmp_path / "l").mkdir()
    local = Case(tmp_path / "l", key, files=files)
    assert module_runner("verify_artifacts", local.args())["verified"] is True
    with open(local.path("empty.bin"), "wb") as handle:
        handle.write(b"grown")
    grown = module_runner("verify_artifacts", local.args())
    assert_fails(grown, "size_mismatch", "empty.bin")
    quarantine(grown)
    (tmp_path / "s").mkdir()
    remote = S3Case(tmp_path / "s", key, s3, files=files)
    result = module_runner("verify_artifacts", remote.args())
    assert result["verified"] is True, result["failures"]
    assert result["bytes_hashed"] == 1


def test_s3_metadata_mode_does_not_download(module_runner, s3case, quarantine):
    """Same size, different bytes, no SHA-256 in the store: only a download could notice."""
    body = bytearray(s3case.files["orders.sqlite"])
    body[500] ^= 0xFF
    s3case.versions["orders.sqlite"] = s3case.s3.put_object(
        Bucket=s3case.bucket, Key=s3case.prefix + "orders.sqlite", Body=bytes(body),
        ChecksumAlgorithm="CRC32")["VersionId"]
    s3case.sign()  # genuine digests, pinned to the tampered version
    meta = module_runner("verify_artifacts", s3case.args(mode="metadata", trusted_state=None))
    assert meta["verified"] is True and meta["bytes_hashed"] == 0
    full = module_runner("verify_artifacts", s3case.args(trusted_state=None))
    assert_fails(full, "digest_mismatch", "orders.sqlite")
    quarantine(full)


# ----------------------------------------------------------------------------- faults while streaming

class _ServedBytes:
    """Fault on the module's own S3 clients at the HTTP layer: GetObject of ``key`` is sent for real
    to the emulator, and the bytes it serves are altered on the way (``flip`` one byte, or ``cut``
    the stream short) before botocore checks them against the store's ChecksumSHA256 header.

    Registered on every S3 client boto3 creates while active (the module builds its own), so the
    real client, the real emulator response, botocore's own checksum validation and our error
    handling all run; only the bytes are changed. ``times`` faulted responses, then real ones.
    """

    def __init__(self, monkeypatch, key, *, flip=None, cut=None, times=1000):
        import threading

        import boto3.session
        self.key, self.flip, self.cut, self.left = key, flip, cut, times
        self.gets, self.faulted, self._lock = 0, 0, threading.Lock()
        real = boto3.session.Session.client
        injector = self

        def client(session, service_name, *args, **kwargs):
            made = real(session, service_name, *args, **kwargs)
            if service_name == "s3":
                made.meta.events.register("before-send.s3.GetObject", injector)
            return made
        monkeypatch.setattr(boto3.session.Session, "client", client)

    def __call__(self, request, **_):
        from urllib.parse import unquote
        from urllib.parse import urlsplit

        from botocore.awsrequest import AWSResponse
        from botocore.httpsession import URLLib3Session

        if not unquote(urlsplit(request.url).path).endswith("/" + self.key):
            return None
        with self._lock:
            self.gets += 1
            if self.left <= 0:
                return None
            self.left -= 1
            self.faulted += 1
        real = URLLib3Session().send(request)  # the emulator's real answer, headers and all
        return AWSResponse(real.url, real.status_code, real.headers, _Altered(real.raw, self.flip, self.cut))


class _Altered:
    """A raw HTTP body whose byte at ``flip`` is inverted, or that ends after ``cut`` bytes."""

    def __init__(self, raw, flip, cut):
        self.raw, self.flip, self.cut, self.pos = raw, flip, cut, 0

    def read(self, amt=None, **_):
        if self.cut is not None:
            amt = self.cut - self.pos if amt is None else min(amt, self.cut - self.pos)
            if amt <= 0:
                return b""
        data = bytearray(self.raw.read(amt))
        if self.flip is not None and self.pos <= self.flip < self.pos + len(data):
            data[self.flip - self.pos] ^= 0xFF
        self.pos += len(data)
        return bytes(data)

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def stream(self, amt=1024, **_):
        while chunk := self.read(amt):
            yield chunk

    def __getattr__(self, name):
        return getattr(self.raw, name)


def test_s3_bytes_contradicting_the_store_checksum_are_metadata_mismatch(module_runner, s3case, monkeypatch,
                                                                          quarantine):
    """The store's ChecksumSHA256 (equal to the signed digest) contradicts the bytes it serves:
    botocore raises FlexibleChecksumError while streaming. The object exists and was read, so the
    reason is metadata_mismatch (never artifact_missing), and the detail names both checksums."""
    before = s3case.state_bytes()
    faults = _ServedBytes(monkeypatch, s3case.prefix + "files.tar", flip=100)
    result = module_runner("verify_artifacts", s3case.args())
    assert faults.faulted >= 1
    f = assert_fails(result, "metadata_mismatch", "files.tar", s3case, before)
    body = bytearray(s3case.files["files.tar"])
    body[100] ^= 0xFF
    signed = hashlib.sha256(s3case.files["files.tar"]).hexdigest()
    served = hashlib.sha256(bytes(body)).hexdigest()
    assert "ChecksumSHA256" in f["detail"] and signed in f["detail"] and served in f["detail"], f["detail"]
    assert f["observed_sha256"] == served and f["observed_size"] == len(body)
    assert f["source"] == s3case.uri("files.tar") and f["version_id"] == s3case.versions["files.tar"]
    quarantine(result, s3case, before)


def test_s3_stream_cut_short_once_is_read_again(module_runner, s3case, monkeypatch):
    """A body that ends early (IncompleteReadError) is transient: the object is read again, and verified."""
    faults = _ServedBytes(monkeypatch, s3case.prefix + "files.tar", cut=100, times=1)
    result = module_runner("verify_artifacts", s3case.args())
    assert result["verified"] is True, result.get("failures") or result.get("msg")
    assert faults.faulted == 1 and faults.gets == 2
    assert result["bytes_hashed"] == sum(len(b) for b in s3case.files.values())


def test_s3_stream_always_cut_short_is_artifact_missing(module_runner, s3case, monkeypatch):
    """A body that always ends early cannot be read: after the retries it is artifact_missing."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts
    before = s3case.state_bytes()
    faults = _ServedBytes(monkeypatch, s3case.prefix + "files.tar", cut=100)
    result = module_runner("verify_artifacts", s3case.args())
    f = assert_fails(result, "artifact_missing", "files.tar", s3case, before)
    assert faults.gets == _artifacts.STREAM_ATTEMPTS
    assert "cut short" in f["detail"] and f["source"] == s3case.uri("files.tar")


# ----------------------------------------------------------------------------- early local run

def _count_verifications(monkeypatch):
    """The client factory of each Verifier.verify call: ``no_client`` for the early local run."""
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import Verifier
    calls, real = [], Verifier.verify

    def verify(self):
        calls.append(self._client.__name__)
        return real(self)
    monkeypatch.setattr(Verifier, "verify", verify)
    return calls


def test_local_set_is_verified_once_before_the_aws_module_exists(module_runner, case, monkeypatch):
    """A local set is verified by the early run (no AWS client), and the module adopts it: one read, not two."""
    calls = _count_verifications(monkeypatch)
    result = module_runner("verify_artifacts", case.args())
    assert result["verified"] is True and result["trusted_state_updated"] is True, result.get("msg")
    assert calls == ["no_client"]
    assert result["bytes_hashed"] == sum(len(b) for b in case.files.values())


def test_early_run_with_other_options_than_the_modules_is_discarded(module_runner, case, monkeypatch):
    from ansible_collections.drguard.sandbox.plugins.module_utils._verify import EarlyRun
    calls = _count_verifications(monkeypatch)
    monkeypatch.setattr(EarlyRun, "matches", lambda self, params: False)
    result = module_runner("verify_artifacts", case.args())
    assert result["verified"] is True, result.get("msg")
    assert calls == ["no_client", "client"]


def test_early_local_failure_is_reported_by_the_module(module_runner, case, monkeypatch, quarantine):
    calls = _count_verifications(monkeypatch)
    before = case.state_bytes()
    _flip(case.path("files.tar"))
    result = module_runner("verify_artifacts", case.args())
    assert_fails(result, "digest_mismatch", "files.tar", case, before)
    assert calls == ["no_client"]
    quarantine(result, case, before)


def test_s3_set_has_no_early_run(module_runner, s3case, monkeypatch):
    calls = _count_verifications(monkeypatch)
    result = module_runner("verify_artifacts", s3case.args())
    assert result["verified"] is True, result.get("msg")
    assert calls == ["client"]


def test_local_set_with_a_kms_trust_policy_is_verified_by_the_module(module_runner, case, aws, monkeypatch):
    """A KMS key in the trust policy needs an AWS client: the early run stops before any artifact
    byte (no client there) and the module verifies with its own clients."""
    calls = _count_verifications(monkeypatch)
    kms = aws("kms")
    kms_key = KmsKey(kms, create_kms_key(kms, "ECC_NIST_P256")["Arn"])
    write_trust_policy(case.policy, [kms_key])
    case.sign(keys=[kms_key])
    result = module_runner("verify_artifacts", case.args())
    assert result["verified"] is True, result.get("msg")
    assert result["manifest"]["keyids"] == [kms_key.keyid]
    assert calls == ["no_client", "client"]
    assert result["bytes_hashed"] == sum(len(b) for b in case.files.values())  # hashed once, by the module


@pytest.mark.parametrize("read_ahead", [False, True], ids=["one-thread", "read-ahead"])
@pytest.mark.parametrize("limit", [0, 5, 1024 * 1024 - 1, 1024 * 1024, 3 * 1024 * 1024 + 7, 9 * 1024 * 1024])
def test_hash_file_reads_at_most_size_plus_one_bytes(tmp_path, limit, read_ahead):
    """The local hash loop (reused buffers, with or without a read-ahead thread) stops one byte past
    the signed size, wherever that falls, and leaves no thread behind."""
    import threading

    from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts
    body = os.urandom(limit + 2 * 1024 * 1024)
    path = tmp_path / "grown.bin"
    path.write_bytes(body)
    threads = threading.active_count()
    fd = os.open(path, os.O_RDONLY)
    try:
        hashed = _artifacts.hash_file(fd, limit, read_ahead=read_ahead)
        assert os.lseek(fd, 0, os.SEEK_CUR) == limit + 1  # bytes read from the file
    finally:
        os.close(fd)
    assert threading.active_count() == threads
    assert hashed.over_limit is True and hashed.sha256 is None and hashed.size == limit + 1
    assert hashed.head == body[:min(limit + 1, 512)]
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = _artifacts.hash_file(fd, len(body), read_ahead=read_ahead)
    finally:
        os.close(fd)
    assert threading.active_count() == threads
    assert whole.over_limit is False and whole.sha256 == hashlib.sha256(body).hexdigest()
    assert whole.size == len(body) and whole.head == body[:512]


@pytest.mark.parametrize("read_ahead", [False, True], ids=["one-thread", "read-ahead"])
def test_hash_file_read_error_is_raised_to_the_caller(tmp_path, read_ahead):
    """A read that fails (here: the descriptor is a directory) raises OSError where the artifact is
    hashed (verify_local turns it into artifact_missing), also when the read-ahead thread hit it."""
    import threading

    from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts
    threads = threading.active_count()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            _artifacts.hash_file(fd, 10, read_ahead=read_ahead)
    finally:
        os.close(fd)
    assert threading.active_count() == threads


@pytest.mark.parametrize(("workers", "count", "read_ahead"), [(1, 1, False), (2, 1, True), (2, 2, False),
                                                              (3, 2, False), (4, 2, True), (8, 3, True)])
def test_local_read_ahead_only_with_a_spare_worker_per_artifact(module_runner, tmp_path, key, monkeypatch,
                                                                  workers, count, read_ahead):
    """``workers`` bounds the threads that read and hash: an artifact gets a read-ahead thread only
    when there are at least two workers for each artifact."""
    from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts
    seen, real = [], _artifacts.hash_file

    def hash_file(fd, limit, read_ahead=False):
        seen.append(read_ahead)
        return real(fd, limit, read_ahead=read_ahead)
    monkeypatch.setattr(_artifacts, "hash_file", hash_file)
    c = Case(tmp_path, key, files={"f%d.bin" % i: os.urandom(1000 + i) for i in range(count)})
    result = module_runner("verify_artifacts", c.args(workers=workers))
    assert result["verified"] is True, result.get("msg")
    assert seen == [read_ahead] * count


def test_relative_local_paths_give_absolute_sources(module_runner, case, monkeypatch, quarantine):
    monkeypatch.chdir(os.path.dirname(case.root))
    _flip(case.path("files.tar"))
    rel = case.args(source=os.path.basename(case.root) + "/./", manifest=os.path.relpath(case.manifest))
    f = assert_fails(module_runner("verify_artifacts", rel), "digest_mismatch", "files.tar")
    assert f["source"] == case.path("files.tar") and os.path.isabs(f["source"])
    quarantine({"failures": [f]})


def _race(monkeypatch, write_other):
    """Make another writer update the trusted state right before this run writes it."""
    original = mf.state_entry

    def racing(*args, **kwargs):
        write_other()
        return original(*args, **kwargs)
    monkeypatch.setattr(mf, "state_entry", racing)


CONCURRENT = {"sequence": 3, "manifest_sha256": "cd" * 32, "accepted_at": "2026-11-29T00:00:00Z"}


def test_s3_concurrent_state_update_is_merged_not_overwritten(module_runner, s3case, monkeypatch):
    def other():
        doc = json.loads(s3case.state_bytes())
        doc["concurrent-set"] = CONCURRENT
        s3case.s3.put_object(Bucket=s3case.bucket, Key=s3case.state_key, Body=json.dumps(doc).encode(),
                             ChecksumAlgorithm="SHA256")
    _race(monkeypatch, other)
    result = module_runner("verify_artifacts", s3case.args())
    assert result["trusted_state_updated"] is True, result
    state = json.loads(s3case.state_bytes())
    assert state["concurrent-set"] == CONCURRENT  # the conditional write noticed and re-read
    assert state[s3case.backup_set]["sequence"] == s3case.sequence
    assert state["some-other-set"] == SEEDED_STATE["some-other-set"]


def test_local_concurrent_equivocation_is_caught_at_write_time(module_runner, case, monkeypatch, quarantine):
    def other():
        doc = json.loads(case.state_bytes())
        doc[case.backup_set] = dict(CONCURRENT, sequence=case.sequence)
        with open(case.state, "w") as handle:
            json.dump(doc, handle)
    _race(monkeypatch, other)
    result = module_runner("verify_artifacts", case.args())
    assert_shape(result)
    assert result.failed and result["verified"] is False and result["trusted_state_updated"] is False
    assert [(f["name"], f["reason"]) for f in result["failures"]] == [(None, "rollback")]
    assert json.loads(case.state_bytes())[case.backup_set]["manifest_sha256"] == CONCURRENT["manifest_sha256"]
    quarantine(result, case, case.state_bytes())


# ----------------------------------------------------------------------------- who writes the trusted state

READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:ListBucketVersions",
                                   "s3:GetObjectRetention", "s3:GetObjectAttributes"], "Resource": "*"}]}
ADMIN = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@pytest.fixture
def read_only_drill(fresh_emulator, monkeypatch, tmp_path, key):
    """A fresh emulator enforcing IAM: a signed S3 backup set with its trusted state in S3, the
    controller's (admin) credentials in the environment and a read-only "drill" user."""
    from conftest import run_module
    from emulator import child_env

    url = fresh_emulator.url
    boot = fresh_emulator.client("s3")
    iam = fresh_emulator.client("iam")
    users = {}
    for name, doc in (("controller", ADMIN), ("drill", READ_ONLY)):
        user = unique(name)
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=name, PolicyDocument=json.dumps(doc))
        access = iam.create_access_key(UserName=user)["AccessKey"]
        users[name] = {"access_key": access["AccessKeyId"], "secret_key": access["SecretAccessKey"]}
    case = S3Case(tmp_path, key, boot)
    case.sign()
    fresh_emulator.enforce_iam()
    case.s3 = fresh_emulator.client("s3", key=users["controller"]["access_key"],
                                    secret=users["controller"]["secret_key"])
    for k, v in child_env(url, {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", users["controller"]["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", users["controller"]["secret_key"])
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    yield case, users["drill"], run_module
    fresh_emulator.relax_iam()


def test_trusted_state_write_denied_is_never_verified(read_only_drill):
    """The drill's read-only session cannot write an S3 trusted state: the result is not verified."""
    case, drill, run = read_only_drill
    before = case.state_bytes()
    result = run("verify_artifacts", case.args(**drill))
    assert_shape(result)
    assert result.failed and result["verified"] is False and result["trusted_state_updated"] is False
    assert result["failures"] == []  # every check passed; the state update did not
    assert result["msg"].startswith("Could not write the trusted state s3://%s/%s" % (case.bucket, case.state_key))
    assert "AccessDenied" in result["msg"] or "Access Denied" in result["msg"], result["msg"]
    assert case.state_bytes() == before


def test_controller_records_the_state_after_a_read_only_verification(read_only_drill):
    """The drill verifies read-only; the controller records the accepted manifest; rollback then advances."""
    case, drill, run = read_only_drill
    before = case.state_bytes()
    verify = run("verify_artifacts", case.args(update_trusted_state=False, **drill))
    assert not verify.failed and verify["verified"] is True and verify["trusted_state_updated"] is False, verify
    assert case.state_bytes() == before
    m = verify["manifest"]
    record = run("trusted_state", {"trusted_state": case.args()["trusted_state"], "backup_set": m["backup_set"],
                                   "sequence": m["sequence"], "manifest_sha256": m["sha256"],
                                   "payload_sha256": m["payload_sha256"]})
    assert not record.failed and record["changed"] is True, record
    state = json.loads(case.state_bytes())
    assert state[case.backup_set]["sequence"] == case.sequence
    assert state["some-other-set"] == SEEDED_STATE["some-other-set"]
    case.sign(case.statement(sequence=case.sequence - 1))
    before = case.state_bytes()
    refused = run("verify_artifacts", case.args(update_trusted_state=False, **drill))
    f = assert_fails(refused, "rollback", None, case, before)
    assert f["detail"] == "sequence %d of %s is lower than the trusted sequence %d" % (
        case.sequence - 1, case.backup_set, case.sequence)
