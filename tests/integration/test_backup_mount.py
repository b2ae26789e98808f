"""backup_access / role backup_mount: the drill reads backups and can write nothing.

S3 denials are proven with IAM enforcement on a fresh emulator: the policy is applied
by the module with an admin user's credentials, the drill role is assumed through STS,
and every write with the role's credentials must come back AccessDenied. The local
case mounts for real (root is available) and proves EROFS.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from conftest import ansible_env
from conftest import REGION
from conftest import ROOT
from conftest import run_module
from emulator import child_env

from ansible_collections.drguard.sandbox.plugins.module_utils._backup_access import mount_entry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind-mount")


def _client(url, service, creds):
    return boto3.client(service, region_name=REGION, endpoint_url=url, **creds)


def _denied(call) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "403")
    return False


@pytest.fixture
def enforced(fresh_emulator, monkeypatch):
    """A fresh emulator with an admin user, a backup bucket, a drill role, then IAM enforcement on."""
    url = fresh_emulator.url
    boot = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    iam = _client(url, "iam", boot)
    admin = "admin-%s" % uuid.uuid4().hex[:6]
    admin_arn = iam.create_user(UserName=admin)["User"]["Arn"]
    iam.put_user_policy(UserName=admin, PolicyName="admin", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=admin)["AccessKey"]
    admin_creds = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}

    s3 = _client(url, "s3", boot)
    bucket = "bm-backups-%s" % uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
    version = s3.put_object(Bucket=bucket, Key="orders/db.sqlite", Body=b"backup",
                            ChecksumAlgorithm="SHA256")["VersionId"]
    s3.put_object(Bucket=bucket, Key="other/secret.bin", Body=b"not ours", ChecksumAlgorithm="SHA256")

    role = "drguard-dr-bm-%s" % uuid.uuid4().hex[:8]
    role_arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": admin_arn},
                                                "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    fresh_emulator.enforce_iam()

    # Modules run in-process with the admin's credentials against this emulator.
    for k, v in child_env(url, {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", admin_creds["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", admin_creds["aws_secret_access_key"])
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)

    def role_session():
        creds = _client(url, "sts", admin_creds).assume_role(RoleArn=role_arn, RoleSessionName="drill")["Credentials"]
        return _client(url, "s3", {"aws_access_key_id": creds["AccessKeyId"],
                                   "aws_secret_access_key": creds["SecretAccessKey"],
                                   "aws_session_token": creds["SessionToken"]})

    return {"url": url, "bucket": bucket, "version": version, "role": role, "admin": admin_creds,
            "role_session": role_session}


def test_s3_policy_allows_reads_and_denies_every_write(enforced):
    e = enforced
    bucket, source = e["bucket"], "s3://%s/orders/" % e["bucket"]
    drill = e["role_session"]()
    # Without the policy the role can read nothing (so the Allow below is the policy's doing).
    assert _denied(lambda: drill.get_object(Bucket=bucket, Key="orders/db.sqlite"))

    res = run_module("backup_access", {"source": source, "role_name": e["role"]}, check_mode=True)
    assert not res.failed and res["changed"] is True, res
    admin_iam = _client(e["url"], "iam", e["admin"])
    assert admin_iam.list_role_policies(RoleName=e["role"])["PolicyNames"] == []

    res = run_module("backup_access", {"source": source, "role_name": e["role"]})
    assert not res.failed and res["changed"] is True, res
    assert res["backup_mount"] == {"kind": "s3", "source": source, "read_only": True}
    assert admin_iam.list_role_policies(RoleName=e["role"])["PolicyNames"] == ["drguard-backup-readonly"]
    again = run_module("backup_access", {"source": source, "role_name": e["role"]})
    assert not again.failed and again["changed"] is False

    drill = e["role_session"]()
    assert drill.get_object(Bucket=bucket, Key="orders/db.sqlite")["Body"].read() == b"backup"
    assert drill.get_object(Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"])["Body"].read() == b"backup"
    keys = [o["Key"] for o in drill.list_objects_v2(Bucket=bucket, Prefix="orders/")["Contents"]]
    assert keys == ["orders/db.sqlite"]
    assert drill.list_object_versions(Bucket=bucket, Prefix="orders/")["Versions"]
    assert drill.get_object_tagging(Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"]) is not None
    # Outside the prefix: nothing.
    assert _denied(lambda: drill.get_object(Bucket=bucket, Key="other/secret.bin"))

    # Every write is denied, including deleting the exact version and touching retention.
    assert _denied(lambda: drill.put_object(Bucket=bucket, Key="orders/evil", Body=b"x", ChecksumAlgorithm="SHA256"))
    assert _denied(lambda: drill.put_object(Bucket=bucket, Key="orders/db.sqlite", Body=b"x",
                                            ChecksumAlgorithm="SHA256"))
    assert _denied(lambda: drill.delete_object(Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"]))
    assert _denied(lambda: drill.delete_object(Bucket=bucket, Key="orders/db.sqlite"))
    assert _denied(lambda: drill.put_object_retention(
        Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"],
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": "2030-01-01T00:00:00Z"}, ChecksumAlgorithm="SHA256"))
    assert _denied(lambda: drill.put_object_legal_hold(Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"],
                                                       LegalHold={"Status": "OFF"}, ChecksumAlgorithm="SHA256"))
    assert _denied(lambda: drill.delete_bucket(Bucket=bucket))
    # The explicit Deny wins even over a careless Allow s3:* the role might get elsewhere.
    admin_iam.put_role_policy(RoleName=e["role"], PolicyName="too-broad", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    drill = e["role_session"]()
    assert drill.get_object(Bucket=bucket, Key="other/secret.bin")["Body"].read() == b"not ours"
    assert _denied(lambda: drill.put_object(Bucket=bucket, Key="orders/evil", Body=b"x", ChecksumAlgorithm="SHA256"))
    assert _denied(lambda: drill.delete_object(Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"]))
    assert _denied(lambda: drill.put_object_retention(
        Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"],
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": "2030-01-01T00:00:00Z"}, ChecksumAlgorithm="SHA256"))
    assert _denied(lambda: drill.delete_bucket(Bucket=bucket))
    admin_iam.delete_role_policy(RoleName=e["role"], PolicyName="too-broad")
    admin_s3 = _client(e["url"], "s3", e["admin"])
    kept = admin_s3.get_object(Bucket=bucket, Key="orders/db.sqlite", VersionId=e["version"])
    assert kept["Body"].read() == b"backup"

    # Withdraw: the policy is gone, reads are denied again; withdrawing twice is a no-op.
    res = run_module("backup_access", {"state": "absent", "source": source, "role_name": e["role"]})
    assert not res.failed and res["changed"] is True
    assert admin_iam.list_role_policies(RoleName=e["role"])["PolicyNames"] == []
    assert _denied(lambda: e["role_session"]().get_object(Bucket=bucket, Key="orders/db.sqlite"))
    res = run_module("backup_access", {"state": "absent", "source": source, "role_name": e["role"]})
    assert not res.failed and res["changed"] is False


def test_s3_missing_role_and_bad_source_fail_clearly(enforced):
    res = run_module("backup_access", {"source": "s3://%s/orders/" % enforced["bucket"], "role_name": "drguard-nope"})
    assert res.failed and "does not exist" in res["msg"]
    res = run_module("backup_access", {"source": "s3://%s/ord*/" % enforced["bucket"], "role_name": "x"})
    assert res.failed and "wildcards" in res["msg"]
    res = run_module("backup_access", {"state": "absent", "source": "s3://%s/orders/" % enforced["bucket"],
                                       "role_name": "drguard-nope"})
    assert not res.failed and res["changed"] is False


def test_s3_prefix_without_slash_is_refused_and_nothing_is_granted(enforced):
    """s3://bkt/orders would grant orders* (orders-payroll/ too): refused before any IAM change."""
    admin_iam = _client(enforced["url"], "iam", enforced["admin"])
    for state in ("present", "absent"):
        res = run_module("backup_access", {"state": state, "source": "s3://%s/orders" % enforced["bucket"],
                                           "role_name": enforced["role"]})
        assert res.failed and "end the prefix with '/'" in res["msg"], res
    assert admin_iam.list_role_policies(RoleName=enforced["role"])["PolicyNames"] == []


def test_s3_diff_mode_shows_the_read_only_policy(enforced):
    e = enforced
    args = {"source": "s3://%s/orders/" % e["bucket"], "role_name": e["role"], "_ansible_diff": True}
    check = run_module("backup_access", args, check_mode=True)
    assert not check.failed and check["changed"] is True, check
    assert check["diff"] == {"before": {}, "after": check["policy"]}
    assert check["policy"]["Statement"][0]["Resource"] == "arn:aws:s3:::%s/orders/*" % e["bucket"]

    put = run_module("backup_access", args)
    assert not put.failed and put["changed"] is True and put["diff"] == check["diff"]
    again = run_module("backup_access", args)
    assert not again.failed and again["changed"] is False
    assert again["diff"]["after"] == put["policy"]
    assert again["diff"]["before"]["Statement"] == put["policy"]["Statement"]
    quiet = run_module("backup_access", {k: v for k, v in args.items() if k != "_ansible_diff"})
    assert "diff" not in quiet, "no diff unless asked for"

    gone = run_module("backup_access", dict(args, state="absent"))
    assert not gone.failed and gone["changed"] is True
    assert gone["diff"]["before"]["Statement"] == put["policy"]["Statement"] and gone["diff"]["after"] == {}
    again = run_module("backup_access", dict(args, state="absent"))
    assert again["changed"] is False and again["diff"] == {"before": {}, "after": {}}


@needs_root
def test_local_read_only_bind_mount(tmp_path):
    src = tmp_path / "backups"
    src.mkdir()
    (src / "db.sqlite").write_bytes(b"backup")
    mnt = tmp_path / "drill" / "backup"
    args = {"source": str(src), "path": str(mnt)}
    try:
        res = run_module("backup_access", args, check_mode=True)
        assert not res.failed and res["changed"] is True
        assert not mnt.exists()

        res = run_module("backup_access", args)
        assert not res.failed, res
        assert res["backup_mount"] == {"kind": "local", "source": str(mnt), "read_only": True}
        assert "ro" in res["mount"]["options"]
        assert (mnt / "db.sqlite").read_bytes() == b"backup"
        with pytest.raises(OSError) as err:
            (mnt / "evil").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
        with pytest.raises(OSError) as err:
            os.unlink(mnt / "db.sqlite")
        assert err.value.errno == errno.EROFS
        assert (src / "db.sqlite").read_bytes() == b"backup"

        again = run_module("backup_access", args)
        assert not again.failed and again["changed"] is False
    finally:
        res = run_module("backup_access", dict(args, state="absent"))
    assert not res.failed and res["changed"] is True
    assert not mnt.exists() and mount_entry(str(mnt)) is None
    assert (src / "db.sqlite").read_bytes() == b"backup"
    res = run_module("backup_access", dict(args, state="absent"))
    assert not res.failed and res["changed"] is False


@needs_root
def test_local_refuses_non_empty_mount_point(tmp_path):
    src, mnt = tmp_path / "s", tmp_path / "m"
    src.mkdir()
    mnt.mkdir()
    (mnt / "data").write_text("keep me")
    res = run_module("backup_access", {"source": str(src), "path": str(mnt)})
    assert res.failed and "not an empty directory" in res["msg"]
    assert mount_entry(str(mnt)) is None and (mnt / "data").exists()


@needs_root
def test_local_fails_closed_without_cap_sys_admin(tmp_path):
    src, mnt = tmp_path / "s", tmp_path / "m"
    src.mkdir()
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"source": str(src), "path": str(mnt)}}))
    module = ROOT / "plugins" / "modules" / "backup_access.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT / ".collections"))
    proc = subprocess.run(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
                           sys.executable, str(module), str(args)],
                          capture_output=True, text=True, env=env, check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.get("failed") and "CAP_SYS_ADMIN" in result["msg"], result
    assert mount_entry(str(mnt)) is None and not mnt.exists()


@needs_root
@pytest.mark.slow
def test_role_backup_mount_local_and_s3_with_ansible_playbook(emulator, aws, tmp_path):
    """The role itself: create (S3 + local) publishes backup_mount__output, delete withdraws both."""
    s3, iam = aws("s3"), aws("iam")
    bucket = "bm-role-%s" % uuid.uuid4().hex[:8]
    s3.create_bucket(Bucket=bucket)
    drill_id = "dr-bm-%s" % uuid.uuid4().hex[:8]
    role = "drguard-%s" % drill_id
    iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                "Action": "sts:AssumeRole"}]}))
    src = tmp_path / "backups"
    src.mkdir()
    (src / "a.tar").write_bytes(b"a")
    mnt = tmp_path / "out" / "backup"
    facts = tmp_path / "facts.json"
    playbook = tmp_path / "play.yml"
    playbook.write_text("""---
- name: Exercise role backup_mount
  hosts: localhost
  gather_facts: false
  tasks:
    - name: S3
      ansible.builtin.include_role:
        name: drguard.sandbox.backup_mount
      vars:
        backup_mount_action: "{{ action }}"
        backup_mount_drill_id: "%(drill)s"
        backup_mount_source: "s3://%(bucket)s/orders/"
    - name: Keep the S3 fact
      ansible.builtin.set_fact:
        s3_fact: "{{ backup_mount__output | default(None) }}"
    - name: Local
      ansible.builtin.include_role:
        name: drguard.sandbox.backup_mount
      vars:
        backup_mount_action: "{{ action }}"
        backup_mount_drill_id: "%(drill)s"
        backup_mount_source: "%(src)s"
        backup_mount_path: "%(mnt)s"
    - name: Dump the facts
      ansible.builtin.copy:
        dest: "%(facts)s"
        content: "{{ {'s3': s3_fact, 'local': backup_mount__output | default(None)} | to_json }}"
        mode: "0600"
""" % {"drill": drill_id, "bucket": bucket, "src": src, "mnt": mnt, "facts": facts})

    def play(action):
        proc = subprocess.run(["ansible-playbook", str(playbook), "-e", "action=%s" % action],
                              capture_output=True, text=True, env=ansible_env(emulator), cwd=str(ROOT),
                              check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    try:
        play("create")
        got = json.loads(facts.read_text())
        assert got["s3"] == {"kind": "s3", "source": "s3://%s/orders/" % bucket, "read_only": True}
        assert got["local"] == {"kind": "local", "source": str(mnt), "read_only": True}
        assert iam.list_role_policies(RoleName=role)["PolicyNames"] == ["drguard-backup-readonly"]
        assert "ro" in mount_entry(str(mnt))["options"]
        with pytest.raises(OSError) as err:
            (mnt / "x").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
    finally:
        play("delete")
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == []
    assert mount_entry(str(mnt)) is None and not Path(mnt).exists()
