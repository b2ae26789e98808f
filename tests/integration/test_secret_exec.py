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


def _drill_entries(drill_id):
    """Names in /dev/shm that belong to ``drill_id`` (its store, exec and home directories)."""
    return {name for name in os.listdir(sec.TMPFS_ROOT) if drill_id in name}


def _values(directory):
    return {name: sec.read_secret_file(directory, name) for name in ("api", "db")}


def test_env_and_file_injection_tmpfs_store(module_runner, tmpfs_drill):
    drill_id, directory = tmpfs_drill
    values = _values(directory)
    password = json.loads(values["db"])["password"]
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
    # Named after the drill, removed after the command; nothing of this drill left in /dev/shm
    # but its store (other xdist workers create and remove their own entries meanwhile).
    assert os.path.basename(report["dir"]).startswith("drguard-exec-%s-" % drill_id), report["dir"]
    assert not os.path.exists(report["dir"])
    assert _drill_entries(drill_id) == {os.path.basename(directory)}

    lines = result["stdout"].splitlines()
    assert "plain ********" in lines and "b64 ********" in lines and "url ********" in lines
    assert 'json {"pw": "********"}' in lines
    assert result["stderr"].strip() == "password only ********"
    text = json.dumps(result)
    for value in (values["api"], values["db"], password):
        for form in sec.secret_forms(value):
            if len(form) >= 6:
                assert form not in text


@pytest.fixture
def sm_drill(module_runner, aws):
    """A drill with a reader role and one synthetic_token ``api`` in Secrets Manager; removed afterwards."""
    drill_id = _id("sm")
    role = aws("iam").create_role(RoleName="drguard-" + drill_id, AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": []}))["Role"]["Arn"]
    created = module_runner("drill_secrets", {
        "drill_id": drill_id, "expires_at": EXPIRES, "reader_role_arn": role,
        "secrets": [{"name": "api", "kind": "synthetic_token"}]})
    assert not created.failed, created.get("msg")
    try:
        yield drill_id
    finally:
        module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent"})


def test_secretsmanager_store_and_failures(module_runner, aws, sm_drill):
    drill_id = sm_drill
    value = aws("secretsmanager").get_secret_value(SecretId="drguard/%s/api" % drill_id)["SecretString"]
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


def test_throttled_secret_read_is_retried(module_runner, sm_drill):
    """GetSecretValue answering ThrottlingException once is retried (it was not: no aws_retry=True)."""
    from test_drill_secrets import throttle_first_calls

    with throttle_first_calls(sm_drill, ("GetSecretValue",)) as throttled:
        result = module_runner("secret_exec", {
            "drill_id": sm_drill, "argv": [sys.executable, "-c", "import os; print(os.environ['T'])"],
            "env_secrets": {"T": "api"}})
    assert not result.failed, result.get("msg")
    assert sorted(throttled) == ["GetSecretValue"] and result["stdout"].strip() == sec.MASK


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


# The documented allow-list (docs/identity.md): the only controller variables a child sees.
ALLOWED = {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME"}
ENV_CHILD = r"""
import json, os, stat, sys
import botocore.session
home = os.environ.get("HOME")
creds = botocore.session.get_session().get_credentials()
print(json.dumps({
    "env": dict(os.environ),
    "home_entries": sorted(os.listdir(home)),
    "home_mode": oct(stat.S_IMODE(os.lstat(home).st_mode)),
    "credentials_found": None if creds is None else creds.get_frozen_credentials().access_key,
}))
"""
CONTROLLER_KEY_ID = "AKIACONTROLLERHOMEKEY"
CONTROLLER_SECRET = "controller-home-secret-0123456789abcdef"


@pytest.fixture
def controller_home(tmp_path, monkeypatch):
    """The controller's HOME with ~/.aws/credentials and ~/.aws/config, plus a VAULT_TOKEN and other junk."""
    home = tmp_path / "controller-home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n" % (CONTROLLER_KEY_ID, CONTROLLER_SECRET))
    (home / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("VAULT_TOKEN", "hvs.controller-vault-token-0123456789")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_controllercontrollercontroller0123")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/ssh-controller/agent.1")  # noqa: S108 - never opened
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    monkeypatch.setenv("LC_CTYPE", "C.UTF-8")
    monkeypatch.setenv("TZ", "UTC")
    # Explicit pointers at the controller's files and identity must not survive either.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    return home


def test_child_gets_allow_listed_environment_and_an_empty_home(module_runner, tmpfs_drill, controller_home):
    drill_id, _directory = tmpfs_drill
    result = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "env_secrets": {"TOKEN": "api"},
                                           "argv": [sys.executable, "-c", ENV_CHILD]})
    assert not result.failed, (result.get("msg"), result.get("stderr"))
    got = json.loads(result["stdout"])
    env = got["env"]
    inherited = {k for k in os.environ if k in ALLOWED or k.startswith("LC_")}
    assert set(env) == inherited | {"HOME", "AWS_EC2_METADATA_DISABLED", "AWS_SHARED_CREDENTIALS_FILE",
                                    "AWS_CONFIG_FILE", "TOKEN"}, sorted(set(env) ^ inherited)
    assert {k: env[k] for k in inherited} == {k: os.environ[k] for k in inherited}
    assert env["TOKEN"] == sec.MASK  # the value itself, redacted in the output
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == env["AWS_CONFIG_FILE"] == os.devnull
    # Its own HOME: empty, 0700, on the tmpfs, named after the drill, gone afterwards.
    home = env["HOME"]
    assert home != str(controller_home) and got["home_entries"] == [] and got["home_mode"] == "0o700"
    assert os.path.dirname(home) == sec.TMPFS_ROOT and os.path.basename(home).startswith(
        "drguard-home-%s-" % drill_id), home
    assert not os.path.exists(home)
    # boto's whole credential chain (env, files, container, instance metadata) finds nothing.
    assert got["credentials_found"] is None
    text = json.dumps(result)
    for value in ("hvs.controller-vault-token", "ghp_controller", CONTROLLER_KEY_ID, CONTROLLER_SECRET,
                  str(controller_home), "testing"):
        assert value not in result["stdout"], value
    assert CONTROLLER_SECRET not in text


def test_pass_aws_credentials_needs_the_explicit_drill_session(module_runner, tmpfs_drill, controller_home,
                                                                tmp_path):
    drill_id, _directory = tmpfs_drill
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').close()", str(marker)]
    # The controller has credentials in its environment (aws_env) and in ~/.aws: neither may be passed on.
    implicit = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "argv": argv,
                                             "pass_aws_credentials": True})
    assert implicit.failed and "pass_aws_credentials needs the drill's session" in implicit["msg"], implicit
    assert not marker.exists()
    profile = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "argv": argv,
                                            "pass_aws_credentials": True, "profile": "default"})
    assert profile.failed and "pass_aws_credentials needs the drill's session" in profile["msg"], profile
    assert not marker.exists()

    session = {"access_key": "ASIADRILLSESSION0001", "secret_key": "drill-session-secret-0123456789abcdef",
               "session_token": "drill-session-token-" + "x" * 40}
    child = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('AWS_')}))")
    explicit = module_runner("secret_exec", dict(session, drill_id=drill_id, store="tmpfs", pass_aws_credentials=True,
                                                 region="eu-central-1", argv=[sys.executable, "-c", child]))
    assert not explicit.failed, (explicit.get("msg"), explicit.get("stderr"))
    aws_vars = json.loads(explicit["stdout"])
    # Every credential value is masked in the output; the names show exactly what the child got.
    assert aws_vars == {"AWS_ACCESS_KEY_ID": sec.MASK, "AWS_SECRET_ACCESS_KEY": sec.MASK,
                        "AWS_SESSION_TOKEN": sec.MASK, "AWS_REGION": "eu-central-1",
                        "AWS_DEFAULT_REGION": "eu-central-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}, aws_vars
    text = json.dumps(explicit)
    assert all(value not in text for value in session.values())


SPAWN_GRANDCHILD = r"""
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()  # out of the child's process group: killpg does not reach it
    time.sleep(float(sys.argv[2]))
    os._exit(0)
with open(sys.argv[1], "w") as handle:
    handle.write(str(pid))
print("child started", flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.mark.parametrize(("child_sleeps", "timeout", "times_out"), [(60, 1, True), (0, 30, False)])
def test_grandchild_holding_stdout_does_not_hang(module_runner, tmpfs_drill, tmp_path, child_sleeps, timeout,
                                                 times_out):
    """A grandchild in its own session keeps the pipes open: the module returns anyway, quickly."""
    import signal
    import time

    drill_id, _directory = tmpfs_drill
    pid_file = tmp_path / "grandchild.pid"
    start = time.monotonic()
    try:
        result = module_runner("secret_exec", {
            "drill_id": drill_id, "store": "tmpfs", "timeout": timeout,
            "argv": [sys.executable, "-c", SPAWN_GRANDCHILD, str(pid_file), "25", str(child_sleeps)]})
        elapsed = time.monotonic() - start
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert elapsed < 12, "the module waited %.1f s for a grandchild holding its stdout" % elapsed
    assert result["stdout"].startswith("child started"), result.get("stdout")
    if times_out:
        assert result.failed and "did not finish within 1 seconds" in result["msg"], result.get("msg")
    else:
        assert not result.failed and result["rc"] == 0, result.get("msg")


def test_output_is_bounded(module_runner, tmpfs_drill):
    """20 MB on stdout and stderr (and a timeout) come back cut to the documented bound."""
    drill_id, _directory = tmpfs_drill
    flood = ("import sys, time\nchunk = 'y' * 65536\nfor _ in range(320):\n    sys.stdout.write(chunk)\n"
             "    sys.stderr.write(chunk)\nsys.stdout.flush()\ntime.sleep(float(sys.argv[1]))\n")
    for sleep, timeout in ((0, 60), (60, 2)):
        result = module_runner("secret_exec", {"drill_id": drill_id, "store": "tmpfs", "timeout": timeout,
                                               "argv": [sys.executable, "-c", flood, str(sleep)]})
        for stream in ("stdout", "stderr"):
            assert result[stream + "_truncated"] is True, (stream, sleep)
            assert result[stream].startswith("y" * 1000)
            assert len(result[stream].encode()) <= 1024 * 1024 + 200, (stream, len(result[stream]))
            assert result[stream].endswith("[output truncated at 1048576 bytes]"), result[stream][-80:]
        if timeout == 2:
            assert result.failed and "did not finish within 2 seconds" in result["msg"]
        else:
            assert not result.failed and result["rc"] == 0, result.get("msg")
