"""Restore and validation on the ec2 runtime's validation instance, through SSM, against the emulator.

The emulator accepts SendCommand and runs nothing: here the restore and the validation must fail
closed ("no result"), the session must reach the secret store (tagged, readable per the runtime
role's per-tier statements, deleted at teardown) and never the command's parameters. What runs on
the instance is proven by taking the exact shell lines the modules sent (read back with
ListCommands) and running them here as the SSM agent would (root, in a mount namespace of their
own with a fresh /run), against the emulator's S3 and secret store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import ROOT
from conftest import ansible_env
from conftest import run_module
from helpers_artifacts import create_versioned_bucket
from helpers_artifacts import sample_files
from test_runtime_ec2 import CONTRACT
from test_runtime_ec2 import _world
from emulator import child_env

from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2_restore as er


def _session():
    tag = uuid.uuid4().hex
    return {"access_key": "ASIADRILL%s" % tag[:11].upper(), "secret_key": "drill-secret-%s" % tag,
            "session_token": "drill-token-%s" % tag}


def _artifacts(s3, files=None):
    bucket = create_versioned_bucket(s3)
    out = []
    kinds = {"orders.sqlite": "sqlite", "files.tar": "tar"}
    for name, body in (files or sample_files(uuid.uuid4().hex[:6])).items():
        key = "prod/%s" % name
        version = s3.put_object(Bucket=bucket, Key=key, Body=body)["VersionId"]
        entry = {"name": name, "verified": True, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                 "source": "s3://%s/%s" % (bucket, key), "version_id": version}
        if name in kinds:
            entry["kind"] = kinds[name]
        out.append(entry)
    # a later version must never be what is restored: the pinned one is
    for entry in out:
        s3.put_object(Bucket=bucket, Key=entry["source"].split("/", 3)[3], Body=b"tampered later")
    return out


def _runtime(aws, tag):
    drill_id, raw, _net = _world(aws, tag, role=False)
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    return drill_id, raw, {u["tier"]: u["instance_id"] for u in res["units"]}


def _sent(ssm, before, comment):
    return [c for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before and c.get("Comment") == comment]


@pytest.fixture
def send_calls(monkeypatch):
    """The InstanceIds of every SendCommand the modules make, by comment, as they go out through botocore.

    (The emulator's ListCommands names every instance it knows as a command's target when the call has
    no Targets, so what was sent to which instance is read here, at the API call.)
    """
    import botocore.client  # noqa: PLC0415

    calls = []
    real = botocore.client.BaseClient._make_api_call  # pylint: disable=protected-access

    def recording(self, operation, params):
        if operation == "SendCommand":
            calls.append((params.get("Comment"), list(params.get("InstanceIds") or []), params.get("Targets")))
        return real(self, operation, params)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
    return calls


def _restore(drill_id, artifacts, session, url, **extra):
    return run_module("restore_artifacts", dict({"artifacts": artifacts, "dest": "/run/drguard/restore",
                                                 "backend": "ec2", "drill_id": drill_id, "endpoint_url": url,
                                                 "command_timeout": 30}, **session, **extra))


def test_restore_and_validation_on_the_emulator_fail_closed_and_the_session_travels_by_name(aws_env, aws,
                                                                                           send_calls):
    sm, ssm, iam, s3 = aws("secretsmanager"), aws("ssm"), aws("iam"), aws("s3")
    drill_id, _raw, instances = _runtime(aws, "ec2rst")
    artifacts = _artifacts(s3)
    session = _session()
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    res = _restore(drill_id, artifacts, session, aws_env.url, session_expiration="2026-12-01T06:00:00Z")
    # the emulator answers Success with empty output: no result, never a pass
    assert res.failed
    assert res["msg"].startswith("no result for artifact orders.sqlite from the validation instance (SSM command ")
    assert "on %s ended Success)" % instances["validation"] in res["msg"]
    # the session is in the secret store, tagged as the drill's, under the runtime prefix
    name = "drguard/%s/runtime/session" % drill_id
    stored = json.loads(sm.get_secret_value(SecretId=name)["SecretString"])
    assert stored == {"AWS_ACCESS_KEY_ID": session["access_key"], "AWS_SECRET_ACCESS_KEY": session["secret_key"],
                      "AWS_SESSION_TOKEN": session["session_token"],
                      "AWS_CREDENTIAL_EXPIRATION": "2026-12-01T06:00:00Z"}
    tags = {t["Key"]: t["Value"] for t in sm.describe_secret(SecretId=name)["Tags"]}
    assert tags == dict(CONTRACT, **{"drguard:drill-id": drill_id})
    # one command, to the validation instance only, carrying the secret's name and no secret value
    sent = _sent(ssm, before, "drguard restore")
    assert len(sent) == 1
    assert [c for c in send_calls if c[0] == "drguard restore"] == [("drguard restore", [instances["validation"]],
                                                                     None)]
    text = json.dumps(sent[0]["Parameters"])
    assert "--secret-id %s" % name in text
    for value in session.values():
        assert value not in text
    assert session["secret_key"] not in json.dumps(res) and session["session_token"] not in json.dumps(res)
    # only the validation instance's statement grants the session; each tier its own bundle
    role = "drguard-%s-runtime" % drill_id
    doc = iam.get_role_policy(RoleName=role, PolicyName="drguard-runtime")["PolicyDocument"]
    grants = {s["Condition"]["ArnEquals"]["ec2:SourceInstanceARN"].rsplit("/", 1)[1]:
              [r.split(":secret:", 1)[1] for r in s["Resource"]] for s in doc["Statement"][1:]}
    prefix = "drguard/%s/runtime/" % drill_id
    assert grants == {instances["app"]: [prefix + "app-??????"], instances["db"]: [prefix + "db-??????"],
                      instances["validation"]: [prefix + "validation-??????", prefix + "session-??????"]}
    # a second run puts the new session value in the same secret
    again = _restore(drill_id, artifacts, dict(session, secret_key="drill-secret-rotated"), aws_env.url)
    assert again["msg"].startswith("no result for artifact orders.sqlite")
    assert json.loads(sm.get_secret_value(SecretId=name)["SecretString"])["AWS_SECRET_ACCESS_KEY"] == \
        "drill-secret-rotated"
    # validation on the instance: no result either, sent to the validation instance only
    restored = [{"name": a["name"], "path": "/run/drguard/restore/%s" % a["name"], "sha256": a["sha256"],
                 "size": a["size"], "on_instance": True} for a in artifacts]
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    val = run_module("validate_restore", {"restored": restored, "backend": "ec2", "drill_id": drill_id,
                                          "command_timeout": 30})
    assert val.failed and val["msg"].startswith("validation on the validation instance failed: no result (SSM "
                                                "command ")
    cmd = run_module("validate_restore", {"restored": restored, "backend": "ec2", "drill_id": drill_id,
                                          "command": ["/bin/true"], "command_timeout": 30})
    assert cmd.failed and cmd["msg"].startswith("no result: the validation command on the validation instance did "
                                                "not report its exit code")
    assert [c for c in send_calls if c[0].startswith("drguard valid")] == [
        ("drguard validate", [instances["validation"]], None),
        ("drguard validation command", [instances["validation"]], None)]
    assert len(_sent(ssm, before, "drguard validate")) == len(_sent(ssm, before, "drguard validation command")) == 1
    # teardown deletes the session with the certificates; nothing of the drill is left in the store
    gone = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})
    assert not gone.failed, gone.get("msg")
    assert name in gone["removed"]["secrets"]
    assert not [s["Name"] for s in sm.list_secrets()["SecretList"] if s["Name"].startswith(prefix)]


def test_the_sweep_deletes_the_session_secret_of_a_killed_drill(aws_env, aws):
    sm, s3 = aws("secretsmanager"), aws("s3")
    drill_id, _raw, _instances = _runtime(aws, "ec2rsw")
    res = _restore(drill_id, _artifacts(s3, {"a.txt": b"x" * 10}), _session(), aws_env.url)
    assert res["msg"].startswith("no result for artifact a.txt")
    swept = run_module("sweep", {"drill_id": drill_id})
    assert not swept.failed, swept.get("msg")
    assert not [s["Name"] for s in sm.list_secrets()["SecretList"]
                if s["Name"].startswith("drguard/%s/" % drill_id)]


def test_bad_input_is_refused_before_any_secret_or_command(aws_env, aws):
    sm, ssm, s3 = aws("secretsmanager"), aws("ssm"), aws("s3")
    drill_id, _raw, _instances = _runtime(aws, "ec2rbad")
    artifacts = _artifacts(s3, {"a.txt": b"abc"})
    local = dict(artifacts[0], name="b.txt", source="/mnt/backup/b.txt")
    count = len(ssm.list_commands()["Commands"])
    res = _restore(drill_id, artifacts + [local], _session(), aws_env.url)
    assert res["msg"] == ("artifact 'b.txt' comes from the local source /mnt/backup/b.txt, which the ec2 runtime's "
                          "validation instance cannot read; restore from S3 or choose drill_runtime.backend netns")
    nosession = _restore(drill_id, artifacts, {}, aws_env.url)
    assert nosession["msg"].startswith("the restore on ec2 needs the drill's session as explicit access_key")
    noid = run_module("restore_artifacts", {"artifacts": artifacts, "dest": "/x", "backend": "ec2"})
    assert noid["msg"] == "drill_id is required with backend ec2: it names the runtime's validation instance"
    assert len(ssm.list_commands()["Commands"]) == count
    assert not [s for s in sm.list_secrets()["SecretList"] if s["Name"] == "drguard/%s/runtime/session" % drill_id]
    # a secret of that name that is not the drill's is never overwritten
    name = "drguard/%s/runtime/session" % drill_id
    sm.create_secret(Name=name, SecretString="{}", Tags=[{"Key": "drguard:drill-id", "Value": "someone-else"}])
    try:
        taken = _restore(drill_id, artifacts, _session(), aws_env.url)
        assert taken["msg"] == ("secret %s exists but is not drill %s's (its drguard:drill-id tag differs); remove it "
                                "or use another drill id" % (name, drill_id))
        assert sm.get_secret_value(SecretId=name)["SecretString"] == "{}"
        assert len(ssm.list_commands()["Commands"]) == count
    finally:
        sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    other = _restore("t-none-%s" % uuid.uuid4().hex[:8], artifacts, _session(), aws_env.url)
    assert other["msg"].startswith("drill t-none-") and "has 0 running instances named" in other["msg"]


# ---------------------------------------------------------------- the sent lines, run here as the agent would


class _Agent:
    """Runs a command's shell lines as root in a mount namespace of its own with a fresh tmpfs on /run."""

    def __init__(self, env, tmp):
        self.env, self.tmp, self.n = env, tmp, 0
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             "mount -t tmpfs -o mode=0755 drguard-test-run /run && echo ready && exec sleep 900"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.holder.stdout.readline() == b"ready\n"

    def run(self, lines):
        self.n += 1
        script = os.path.join(self.tmp, "script-%d.sh" % self.n)
        with open(script, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        proc = subprocess.run(["nsenter", "--target", str(self.holder.pid), "--mount", "--", "sh", script],
                              env=self.env, capture_output=True, text=True, timeout=300, check=False)
        return {"instance_id": "local", "command_id": "local-%d" % self.n,
                "status": "Success" if proc.returncode == 0 else "Failed", "response_code": proc.returncode,
                "stdout": proc.stdout, "stderr": proc.stderr}

    def close(self):
        os.killpg(self.holder.pid, 9)
        self.holder.wait()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("aws") or not shutil.which("nsenter"),
                    reason="runs the agent's lines as root (unshare, setpriv) with the aws CLI")
def test_the_sent_lines_really_restore_and_validate_when_an_agent_runs_them(aws_env, aws, tmp_path):
    ssm, s3 = aws("ssm"), aws("s3")
    drill_id, _raw, _instances = _runtime(aws, "ec2agent")
    artifacts = _artifacts(s3)
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    assert _restore(drill_id, artifacts, _session(), aws_env.url).failed
    restore_lines = _sent(ssm, before, "drguard restore")[0]["Parameters"]["commands"]
    # the agent's role: the controller's emulator credentials from the environment (IMDS on AWS)
    agent = _Agent(child_env(aws_env.url), str(tmp_path))
    try:
        res = agent.run(restore_lines)
        assert res["status"] == "Success", res["stderr"][-2000:]
        items = er.checked_artifacts(artifacts)
        restored = er.parse_restore_output(res, items)
        assert [r["path"] for r in restored] == ["/run/drguard/restore/orders.sqlite", "/run/drguard/restore/files.tar",
                                                 "/run/drguard/restore/logs/app.log"]
        # owned by the workload's uid, read-only, on its own tmpfs; the session file is gone
        look = agent.run(["stat -c '%u %a %n' /run/drguard/restore/orders.sqlite /run/drguard/restore/logs/app.log",
                          "test ! -e /run/drguard/session/session.json && echo session-gone",
                          "findmnt -n -o FSTYPE /run/drguard/restore",
                          "sha256sum /run/drguard/restore/orders.sqlite"])
        assert look["stdout"].splitlines() == [
            "65534 400 /run/drguard/restore/orders.sqlite", "65534 400 /run/drguard/restore/logs/app.log",
            "session-gone", "tmpfs", "%s  /run/drguard/restore/orders.sqlite" % artifacts[0]["sha256"]]
        # the validation: its lines as sent, over the restored files
        before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
        assert run_module("validate_restore", {"restored": restored, "backend": "ec2", "drill_id": drill_id,
                                               "command_timeout": 30}).failed
        checks = agent.run(_sent(ssm, before, "drguard validate")[0]["Parameters"]["commands"])
        request = er.validate_request(restored, 1, er._workloads.Caps(), extract=True)
        results = er.parse_validate_output(checks, request["restored"])
        assert [(r["name"], r["kind"], r["valid"]) for r in results] == [
            ("orders.sqlite", "sqlite", True), ("files.tar", "tar", True), ("logs/app.log", "raw", True)]
        assert results[0]["tables"] == {"orders": 50} and results[1]["members"] == 2
        # the user's command: unprivileged, in the restore directory, an environment of its own only
        argv = ["/bin/sh", "-c", "id -u; pwd; ls; env | cut -d= -f1; exit 4"]
        assert run_module("validate_restore", {"restored": restored, "backend": "ec2", "drill_id": drill_id,
                                               "command": argv, "command_timeout": 30}).failed
        user = agent.run(_sent(ssm, before, "drguard validation command")[0]["Parameters"]["commands"])
        rc, output = er.parse_user_output(user)
        assert rc == 4
        lines = output.splitlines()
        assert lines[:5] == ["65534", "/run/drguard/restore", "files.tar", "logs", "orders.sqlite"]
        # what the shell adds (PWD, SHLVL, _) besides the three it is given; no AWS variable, no secret
        assert {"HOME", "LANG", "PATH"} <= set(lines[5:]) <= {"HOME", "LANG", "PATH", "PWD", "SHLVL", "_"}
        # a script on the controller is handed in (root's, read-only) and named on the instance
        script = tmp_path / "check-restore.sh"
        script.write_text("id -u\nwc -c < orders.sqlite\nls -l %s/check-restore.sh | cut -c1-10\n"
                          % er.SCRIPT_DIR)
        before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
        assert run_module("validate_restore", {"restored": restored, "backend": "ec2", "drill_id": drill_id,
                                               "command": ["/bin/sh", str(script)], "script": str(script),
                                               "command_timeout": 30}).failed
        sent = _sent(ssm, before, "drguard validation command")[0]["Parameters"]["commands"]
        assert str(script) not in json.dumps(sent)
        rc, output = er.parse_user_output(agent.run(sent))
        assert (rc, output.splitlines()) == (0, ["65534", str(artifacts[0]["size"]), "-r--r--r--"])
        # a digest other than the verified one: the instance's figures do not match, the file is not kept
        bad = [dict(artifacts[0], sha256="0" * 64)]
        before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
        assert _restore(drill_id, bad, _session(), aws_env.url).failed
        res = agent.run(_sent(ssm, before, "drguard restore")[0]["Parameters"]["commands"])
        with pytest.raises(er.Ec2RestoreError) as exc:
            er.parse_restore_output(res, er.checked_artifacts(bad))
        assert str(exc.value).startswith("orders.sqlite: the bytes restored on the validation instance differ from "
                                         "what was verified (size %d, sha256 %s; verified %d, %s)"
                                         % (artifacts[0]["size"], artifacts[0]["sha256"], artifacts[0]["size"],
                                            "0" * 64))
        assert agent.run(["ls -A /run/drguard/restore"])["stdout"] == ""
    finally:
        agent.close()


def test_runtime_verify_reports_the_old_all_tiers_secret_statement_as_not_least_privilege(aws_env, aws):
    iam, ec2 = aws("iam"), aws("ec2")
    drill_id, raw, _instances = _runtime(aws, "ec2pol")
    clean = run_module("runtime_verify", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert (clean.failed, clean["isolated"], clean["findings"]) == (False, True, []), clean.get("msg")
    # the policy every tier's instance could read every runtime secret with (other tiers' keys, the session)
    role = "drguard-%s-runtime" % drill_id
    doc = iam.get_role_policy(RoleName=role, PolicyName="drguard-runtime")["PolicyDocument"]
    account = iam.get_role(RoleName=role)["Role"]["Arn"].split(":")[4]
    wide = {"Version": "2012-10-17", "Statement": doc["Statement"][:1] + [{
        "Sid": "DrillSecrets", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
        "Resource": ["arn:aws:secretsmanager:%s:%s:secret:drguard/%s/runtime/*" % (ec2.meta.region_name, account,
                                                                                   drill_id)]}]}
    iam.put_role_policy(RoleName=role, PolicyName="drguard-runtime", PolicyDocument=json.dumps(wide))
    found = run_module("runtime_verify", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert [(f["code"], f["resource"]) for f in found["findings"]] == [("runtime_instance_role", role)]
    assert "grants other than the SSM agent's actions and each tier's instance its own runtime secret" in \
        found["findings"][0]["detail"]
    # a second run of the runtime puts the per-tier statements back
    again = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert again["actions"] == ["put policy drguard-runtime of role %s" % role]
    assert run_module("runtime_verify", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})["findings"] == []


def _phase(emu, tmp_path, phase, variables, session=None):
    defaults = {"group/drguard.sandbox.aws": {"region": "us-east-1", "endpoint_url": emu.url}}
    if session:  # as drill.yml's module_defaults hand the drill's session to restore_artifacts
        defaults["drguard.sandbox.restore_artifacts"] = session
    play = [{"hosts": "localhost", "gather_facts": False, "vars": variables, "module_defaults": defaults,
             "tasks": [{"ansible.builtin.include_tasks": str(ROOT / "playbooks" / "phases" / ("%s.yml" % phase))}]}]
    path = tmp_path / ("%s.yml" % phase)
    path.write_text(yaml.safe_dump(play))
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), str(path)],
                          env=ansible_env(emu), cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_the_phases_run_on_the_validation_instance_and_fail_closed_on_the_emulator(aws_env, aws, tmp_path):
    s3, ssm = aws("s3"), aws("ssm")
    drill_id, raw, instances = _runtime(aws, "ec2phase")
    artifacts = _artifacts(s3, {"orders.sqlite": b"SQLite format 3\x00" + b"x" * 100})
    session = _session()
    base = {"_drill_args": {"runtime": {"backend": "ec2"}, "validation": None},
            "drill_ctx": {"drill_id": drill_id, "output_dir": str(tmp_path)},
            "_drill_live_boundary": raw}
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    restore = _phase(aws_env, tmp_path, "restore", dict(base, drill_verify_result={"artifacts": artifacts}), session)
    assert restore.returncode != 0
    assert "no result for artifact orders.sqlite from the validation instance" in restore.stdout, \
        restore.stdout[-2000:]
    for value in session.values():
        assert value not in restore.stdout + restore.stderr
    restored = [{"name": "orders.sqlite", "path": "/run/drguard/restore/orders.sqlite", "sha256": artifacts[0][
        "sha256"], "size": artifacts[0]["size"], "on_instance": True}]
    validate = _phase(aws_env, tmp_path, "validate", dict(base, drill_restore_result={"restored": restored}))
    assert validate.returncode != 0
    assert "validation on the validation instance failed: no result" in validate.stdout, validate.stdout[-2000:]
    assert "on %s ended Success" % instances["validation"] in validate.stdout
    assert len(_sent(ssm, before, "drguard restore")) == len(_sent(ssm, before, "drguard validate")) == 1
