"""secret_exec: secrets injected at runtime (env + tmpfs files), outputs masked, nothing left behind."""

from __future__ import annotations

import json
import os
import sys
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec

EXPIRES = "2099-01-01T00:00:00Z"

# The child reports what it received, and echoes secrets in several encodings.
CHILD = r"""
import base64, json, os, stat, sys, urllib.parse
d = os.environ["DRGUARD_SECRETS_DIR"]
token = os.environ["TOKEN"]
db = json.loads(os.environ["DB"])
with open(os.path.join(d, "token.txt")) as f:
    from_file = f.read()
mounts = [l.split() for l in open("/proc/mounts")]
fstype = [m[2] for m in mounts if m[1] == os.path.dirname(d)]
print(json.dumps({
    "dir": d,
    "dir_mode": oct(stat.S_IMODE(os.stat(d).st_mode)),
    "file_mode": oct(stat.S_IMODE(os.stat(os.path.join(d, "token.txt")).st_mode)),
    "files": sorted(os.listdir(d)),
    "fstype": fstype,
    "file_matches_env": from_file == token,
    "controller_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
    "argv": sys.argv[1:],
}))
print("plain", token)
print("b64", base64.b64encode(token.encode()).decode())
print("url", urllib.parse.quote(db["password"], safe=""))
print("json", json.dumps({"pw": db["password"]}))
print("password only", db["password"], file=sys.stderr)
"""


def _id(prefix="se"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def _report(stdout):
    return json.loads(stdout.splitlines()[0])


@pytest.fixture
def tmpfs_drill(module_runner):
    drill_id = _id()
    args = {"drill_id": drill_id, "expires_at": EXPIRES, "store": "tmpfs",
            "secrets": [{"name": "api", "kind": "synthetic_token"}, {"name": "db", "kind": "synthetic_db"}]}
    created = module_runner("drill_secrets", args)
    assert not created.failed, created.get("msg")
    yield drill_id, created["tmpfs_dir"]
    module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent", "store": "tmpfs"})


def _values(directory):
    return {name: sec.read_secret_file(directory, name) for name in ("api", "db")}


def test_env_and_file_injection_tmpfs_store(module_runner, tmpfs_drill):
    drill_id, directory = tmpfs_drill
    values = _values(directory)
    password = json.loads(values["db"])["password"]
    before = set(os.listdir(sec.TMPFS_ROOT))
    result = module_runner("secret_exec", {
        "drill_id": drill_id, "store": "tmpfs", "argv": [sys.executable, "-c", CHILD, "visible-arg"],
        "env_secrets": {"TOKEN": "api", "DB": "db"}, "file_secrets": {"token.txt": "api"}})
    assert not result.failed, (result.get("msg"), result.get("stderr"))
    assert result["rc"] == 0 and result["changed"] is False and result["seconds"] >= 0
    report = _report(result["stdout"])
    assert report["dir_mode"] == "0o700" and report["file_mode"] == "0o600"
    assert report["files"] == ["token.txt"] and report["file_matches_env"] is True
    assert report["fstype"] and report["fstype"][-1] == "tmpfs"
    assert report["controller_key"] is None
    assert report["argv"] == ["visible-arg"]
    # Removed after the command, and nothing new left in /dev/shm.
    assert not os.path.exists(report["dir"])
    assert set(os.listdir(sec.TMPFS_ROOT)) - before == set()

    lines = result["stdout"].splitlines()
    assert "plain ********" in lines and "b64 ********" in lines and "url ********" in lines
    assert 'json {"pw": "********"}' in lines
    assert result["stderr"].strip() == "password only ********"
    text = json.dumps(result)
    for value in (values["api"], values["db"], password):
        for form in sec.secret_forms(value):
            if len(form) >= 6:
                assert form not in text


def test_secretsmanager_store_and_failures(module_runner, aws):
    drill_id = _id("sm")
    role = aws("iam").create_role(RoleName="drguard-" + drill_id, AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}))["Role"]["Arn"]
    created = module_runner("drill_secrets", {
        "drill_id": drill_id, "expires_at": EXPIRES, "reader_role_arn": role,
        "secrets": [{"name": "api", "kind": "synthetic_token"}]})
    assert not created.failed, created.get("msg")
    value = aws("secretsmanager").get_secret_value(SecretId="drguard/%s/api" % drill_id)["SecretString"]
    try:
        ok = module_runner("secret_exec", {
            "drill_id": drill_id, "argv": [sys.executable, "-c", "import os; print(os.environ['T'])"],
            "env_secrets": {"T": "api"}, "access_key": "testing", "secret_key": "testing"})
        assert not ok.failed, ok.get("msg")
        assert ok["stdout"].strip() == "********" and value not in json.dumps(ok)

        failing = module_runner("secret_exec", {
            "drill_id": drill_id, "argv": [sys.executable, "-c",
                                           "import os, sys; print(os.environ['T']); "
                                           "print(os.environ['DRGUARD_SECRETS_DIR']); sys.exit(3)"],
            "env_secrets": {"T": "api"}, "file_secrets": {"t": "api"}})
        assert failing.failed and failing["rc"] == 3 and "rc 3" in failing["msg"]
        masked, left = failing["stdout"].split()
        assert masked == "********" and value not in json.dumps(failing)
        assert left.startswith(sec.TMPFS_ROOT + "/drguard-exec-") and not os.path.exists(left)

        slow = module_runner("secret_exec", {"drill_id": drill_id, "timeout": 1,
                                             "argv": [sys.executable, "-c", "import time; time.sleep(30)"]})
        assert slow.failed and "did not finish within 1 seconds" in slow["msg"]

        missing = module_runner("secret_exec", {"drill_id": drill_id, "argv": ["true"],
                                                "env_secrets": {"T": "nope"}})
        assert missing.failed and "does not exist" in missing["msg"]

        bad = module_runner("secret_exec", {"drill_id": drill_id, "argv": ["true"],
                                            "file_secrets": {"../escape": "api"}})
        assert bad.failed and "plain file name" in bad["msg"]

        check = module_runner("secret_exec", {"drill_id": drill_id, "argv": ["false"]}, check_mode=True)
        assert not check.failed and check.get("skipped") is True
    finally:
        module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent"})


def test_tmpfs_store_missing_or_not_ours(module_runner, tmp_path):
    drill_id = _id("nostore")
    missing = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "argv": ["true"],
                                            "env_secrets": {"T": "api"}})
    assert missing.failed and "does not exist" in missing["msg"]
    on_disk = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "argv": ["true"],
                                            "tmpfs_dir": str(tmp_path / "store"), "env_secrets": {"T": "api"}})
    assert on_disk.failed and "not tmpfs" in on_disk["msg"]
    link = os.path.join(sec.TMPFS_ROOT, "drguard-" + drill_id)
    os.symlink(str(tmp_path), link)
    try:
        linked = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "argv": ["true"],
                                               "env_secrets": {"T": "api"}})
        assert linked.failed and "symlink" in linked["msg"]
    finally:
        os.unlink(link)
