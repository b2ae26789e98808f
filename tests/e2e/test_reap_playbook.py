"""playbooks/reap.yml end to end: ansible-playbook against an emulator of the test's own."""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
from datetime import datetime
from datetime import timedelta
from datetime import UTC
from pathlib import Path

import pytest
from conftest import ROOT, ansible_env, run_module

from ansible_collections.drguard.sandbox.plugins.module_utils.drill import drill_tags
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list as tag_list

pytestmark = pytest.mark.slow

ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})


def rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def locked_evidence_bucket(aws, drill_id: str, expires: str) -> str:
    """A bucket of ``drill_id`` holding one object under COMPLIANCE retention: it cannot be deleted."""
    s3 = aws("s3")
    bucket = "drguard-%s-evidence" % drill_id
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list(drill_tags(drill_id, expires))})
    s3.put_object(Bucket=bucket, Key="evidence.bin", Body=b"keep", ObjectLockMode="COMPLIANCE",
                  ObjectLockRetainUntilDate=datetime.now(UTC) + timedelta(days=1))
    return bucket


def small_world(aws, drill_id: str, expires: str, octet: int) -> set:
    """A drill-shaped set of tagged resources, named as the drill names them; returns {(type, id)}."""
    tags = drill_tags(drill_id, expires)
    base = "drguard-" + drill_id
    ec2 = aws("ec2")

    def spec(rtype):
        return [{"ResourceType": rtype, "Tags": tag_list(dict(tags, Name=base))}]
    vpc = ec2.create_vpc(CidrBlock="10.%d.0.0/16" % octet, TagSpecifications=spec("vpc"))["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.%d.1.0/24" % octet,
                               TagSpecifications=spec("subnet"))["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName=base + "-app", Description="drill", VpcId=vpc,
                                   TagSpecifications=spec("security-group"))["GroupId"]
    igw = ec2.create_internet_gateway(TagSpecifications=spec("internet-gateway"))["InternetGateway"]
    ec2.attach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc)
    iam = aws("iam")
    iam.create_role(RoleName=base + "-runner", Path="/drguard/", AssumeRolePolicyDocument=TRUST, Tags=tag_list(tags))
    iam.put_role_policy(RoleName=base + "-runner", PolicyName="inline", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}))
    s3 = aws("s3")
    s3.create_bucket(Bucket=base + "-telemetry")
    s3.put_bucket_tagging(Bucket=base + "-telemetry", Tagging={"TagSet": tag_list(tags)})
    s3.put_object(Bucket=base + "-telemetry", Key="events.json", Body=b"{}")
    secret = aws("secretsmanager").create_secret(Name="drguard/%s/db" % drill_id, SecretString="synthetic",
                                                 Tags=tag_list(tags))["ARN"]
    aws("logs").create_log_group(logGroupName="/drguard/" + drill_id, tags=tags)
    return {("vpc", vpc), ("subnet", subnet), ("security_group", sg), ("internet_gateway", igw["InternetGatewayId"]),
            ("iam_role", base + "-runner"), ("s3_bucket", base + "-telemetry"), ("secret", secret),
            ("log_group", "/drguard/" + drill_id)}


def existing(aws, resources: set) -> set:
    """Which of ``resources`` still exist, read back through the services (not through the sweep)."""
    ec2, iam, s3, sm, logs = aws("ec2"), aws("iam"), aws("s3"), aws("secretsmanager"), aws("logs")
    out = set()
    for rtype, rid in resources:
        try:
            if rtype == "vpc":
                present = bool(ec2.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [rid]}])["Vpcs"])
            elif rtype == "subnet":
                present = bool(ec2.describe_subnets(Filters=[{"Name": "subnet-id", "Values": [rid]}])["Subnets"])
            elif rtype == "security_group":
                present = bool(ec2.describe_security_groups(
                    Filters=[{"Name": "group-id", "Values": [rid]}])["SecurityGroups"])
            elif rtype == "internet_gateway":
                present = bool(ec2.describe_internet_gateways(
                    Filters=[{"Name": "internet-gateway-id", "Values": [rid]}])["InternetGateways"])
            elif rtype == "iam_role":
                iam.get_role(RoleName=rid)
                present = True
            elif rtype == "s3_bucket":
                s3.head_bucket(Bucket=rid)
                present = True
            elif rtype == "secret":
                present = not sm.describe_secret(SecretId=rid).get("DeletedDate")
            elif rtype == "log_group":
                groups = logs.describe_log_groups(logGroupNamePrefix=rid)["logGroups"]
                present = any(g["logGroupName"] == rid for g in groups)
            else:
                raise AssertionError(rtype)
        except aws("iam").exceptions.NoSuchEntityException:
            present = False
        except Exception as exc:  # noqa: BLE001 - a NotFound of any service means gone
            if "NotFound" in type(exc).__name__ or "404" in str(exc) or "ResourceNotFound" in str(exc):
                present = False
            else:
                raise
        if present:
            out.add((rtype, rid))
    return out


def summary(stdout: str) -> str:
    """The reaper's printed summary (from its headline to the next task)."""
    assert "REAP SUMMARY" in stdout, stdout[-3000:]
    text = stdout[stdout.index("REAP SUMMARY"):]
    return text[:text.index("TASK [")] if "TASK [" in text else text


def reap(emu, *extra_vars: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [ANSIBLE_PLAYBOOK, "playbooks/reap.yml"]
    for var in extra_vars:
        cmd += ["-e", var]
    return subprocess.run(cmd, env=ansible_env(emu, env_extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_reap_deletes_only_expired_resources(fresh_emulator):
    aws = fresh_emulator.client
    now = datetime.now(UTC)
    old, young = "dr-old-%s" % secrets.token_hex(3), "dr-young-%s" % secrets.token_hex(3)
    expired = small_world(aws, old, rfc3339(now - timedelta(hours=1)), 20)
    alive = small_world(aws, young, rfc3339(now + timedelta(hours=1)), 22)

    dry = reap(fresh_emulator, "reap_region=us-east-1", "reap_dry_run=true")
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-2000:]
    text = summary(dry.stdout)
    assert text.startswith("REAP SUMMARY (dry run, nothing deleted)")
    assert "found=%d deleted=0 remaining=0" % len(expired) in text
    for rtype, rid in expired:
        assert "%s %s drill=%s" % (rtype, rid, old) in text
    assert young not in text
    assert existing(aws, expired) == expired, "the dry run deleted something"
    assert existing(aws, alive) == alive

    real = reap(fresh_emulator, "reap_region=us-east-1", "reap_endpoint_url=%s" % fresh_emulator.url)
    assert real.returncode == 0, real.stdout[-4000:] + real.stderr[-2000:]
    text = summary(real.stdout)
    assert text.startswith("REAP SUMMARY (deleted)")
    assert "found=%d deleted=%d remaining=0" % (len(expired), len(expired)) in text
    for rtype, rid in expired:
        assert "%s %s drill=%s" % (rtype, rid, old) in text
    assert young not in text
    assert existing(aws, expired) == set()
    assert existing(aws, alive) == alive

    again = reap(fresh_emulator, "reap_region=us-east-1")
    assert again.returncode == 0, again.stdout[-4000:]
    assert "found=0 deleted=0 remaining=0" in summary(again.stdout)

    # Judged as of two hours from now, the young drill has expired as well.
    later = reap(fresh_emulator, "reap_region=us-east-1", "reap_as_of=%s" % rfc3339(now + timedelta(hours=2)))
    assert later.returncode == 0, later.stdout[-4000:]
    assert existing(aws, alive) == set()


def test_reap_ignores_a_planted_state_file_and_refuses_what_proves_nothing(fresh_emulator):
    """A state.json planted under the output root names untagged resources: they survive. So does a resource
    carrying only drguard:managed=true, or an expiry that is no RFC 3339 time; the summary reports both."""
    aws = fresh_emulator.client
    now = datetime.now(UTC)
    drill = "dr-plant-%s" % secrets.token_hex(3)
    s3, iam, ec2, logs = aws("s3"), aws("iam"), aws("ec2"), aws("logs")
    bucket = "prod-%s" % drill
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"one", b"two"):
        s3.put_object(Bucket=bucket, Key="ledger.json", Body=body)
    iam.create_role(RoleName="prod-" + drill, AssumeRolePolicyDocument=TRUST)
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    state_dir = ROOT / "drill-runs" / drill
    state_dir.mkdir(parents=True)
    (state_dir / "state.json").write_text(json.dumps({
        "drill_id": drill, "region": "us-east-1", "started_at": rfc3339(now - timedelta(hours=2)),
        "expires_at": rfc3339(now - timedelta(hours=1)),
        "extra_resources": [{"type": "s3_bucket", "id": bucket}, {"type": "iam_role", "id": "prod-" + drill},
                            {"type": "vpc", "id": vpc}]}))
    logs.create_log_group(logGroupName="/drguard/%s/managed-only" % drill, tags={"drguard:managed": "true"})
    bad_expiry = dict(drill_tags(drill, "2001-01-01T00:00:00Z"), **{"drguard:expires-at": "yesterday"})
    logs.create_log_group(logGroupName="/drguard/%s/bad-expiry" % drill, tags=bad_expiry)
    try:
        res = reap(fresh_emulator, "reap_region=us-east-1")
    finally:
        (state_dir / "state.json").unlink()
        state_dir.rmdir()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    text = summary(res.stdout)
    assert "found=0 deleted=0 remaining=0 refused=2" in text
    assert "log_group /drguard/%s/managed-only drill= expires_at= reason=tag drguard:drill-id is missing" \
        % drill in text
    assert ("log_group /drguard/%s/bad-expiry drill=%s expires_at=yesterday reason=tag drguard:expires-at "
            "'yesterday' is not an RFC 3339 time with a zone" % (drill, drill)) in text
    assert len(s3.list_object_versions(Bucket=bucket)["Versions"]) == 2
    iam.get_role(RoleName="prod-" + drill)
    assert ec2.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Vpcs"]
    groups = {g["logGroupName"] for g in logs.describe_log_groups(logGroupNamePrefix="/drguard/" + drill)["logGroups"]}
    assert groups == {"/drguard/%s/managed-only" % drill, "/drguard/%s/bad-expiry" % drill}


def test_reap_fails_and_names_what_remains(fresh_emulator):
    aws = fresh_emulator.client
    drill = "dr-locked-%s" % secrets.token_hex(3)
    bucket = locked_evidence_bucket(aws, drill, "2001-01-01T00:00:00Z")
    res = reap(fresh_emulator, "reap_region=us-east-1")
    assert res.returncode != 0
    text = summary(res.stdout)
    assert "remaining=1" in text
    assert "s3_bucket %s drill=%s" % (bucket, drill) in text
    assert "Object Lock" in text
    assert "The reaper did not prove that nothing expired remains" in res.stdout


def reap_from_stats(emu, name: str, stats: dict):
    """reap.yml as the AWX workflow's reaper node runs it: the drill job's set_stats figures as extra vars."""
    path = ROOT / ".ansible" / ("stats-%s.json" % name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(stats, reap_drill_from_stats=True)))
    try:
        return reap(emu, "reap_region=us-east-1", "@%s" % path)
    finally:
        path.unlink()


def test_reap_one_drill_whatever_its_expiry(fresh_emulator):
    """reap_drill_id tears down that drill's resources although they have not expired; another drill's stay.
    The AWX workflow's reaper node gets the id from the drill's set_stats (reap_drill_from_stats)."""
    aws = fresh_emulator.client
    later = rfc3339(datetime.now(UTC) + timedelta(hours=2))
    target, other = "dr-one-%s" % secrets.token_hex(3), "dr-two-%s" % secrets.token_hex(3)
    mine = small_world(aws, target, later, 40)
    theirs = small_world(aws, other, later, 42)

    dry = reap(fresh_emulator, "reap_region=us-east-1", "reap_drill_id=%s" % target, "reap_dry_run=true")
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-2000:]
    text = summary(dry.stdout)
    assert "target=drill %s (whatever its expiry)" % target in text
    assert "found=%d deleted=0 remaining=0" % len(mine) in text
    assert existing(aws, mine) == mine

    # As the workflow passes it: the drill's set_stats figures as extra vars.
    real = reap_from_stats(fresh_emulator, target, {"drill": {"drill_id": target, "outcome": "failed"}})
    assert real.returncode == 0, real.stdout[-4000:] + real.stderr[-2000:]
    text = summary(real.stdout)
    assert "target=drill %s (whatever its expiry)" % target in text
    assert "found=%d deleted=%d remaining=0" % (len(mine), len(mine)) in text
    assert other not in text
    assert existing(aws, mine) == set()
    assert existing(aws, theirs) == theirs

    # No drill id in the stats (the drill died before publishing them): the expired sweep, which spares theirs.
    fallback = reap(fresh_emulator, "reap_region=us-east-1", "reap_drill_from_stats=true")
    assert fallback.returncode == 0, fallback.stdout[-4000:]
    assert "target=expired resources" in summary(fallback.stdout)
    assert existing(aws, theirs) == theirs


def test_reap_the_drills_of_a_many_drill_run_from_its_stats(fresh_emulator):
    """After a run of many drill hosts the workflow passes set_stats `drills`: every drill named there goes, in one
    sweep, whatever its expiry; a drill not named there stays."""
    aws = fresh_emulator.client
    later = rfc3339(datetime.now(UTC) + timedelta(hours=2))
    one, two, other = ("dr-%s-%s" % (n, secrets.token_hex(3)) for n in ("many", "more", "else"))
    worlds = {d: small_world(aws, d, later, octet) for d, octet in ((one, 44), (two, 46), (other, 48))}
    real = reap_from_stats(fresh_emulator, one, {"drills": {"orders-db": {"drill_id": one, "outcome": "passed"},
                                                            "billing-db": {"drill_id": two, "outcome": "failed"}}})
    assert real.returncode == 0, real.stdout[-4000:] + real.stderr[-2000:]
    text = summary(real.stdout)
    assert "target=drill %s (whatever its expiry)" % ", ".join([one, two]) in text or \
        "target=drill %s (whatever its expiry)" % ", ".join([two, one]) in text, text
    gone = len(worlds[one]) + len(worlds[two])
    assert "found=%d deleted=%d remaining=0" % (gone, gone) in text
    assert existing(aws, worlds[one]) == existing(aws, worlds[two]) == set()
    assert existing(aws, worlds[other]) == worlds[other]


@pytest.mark.parametrize(("extra_vars", "env_extra", "message"), [
    (["reap_region=us-east-1", "reap_as_of=yesterday"], {}, "reap_as_of 'yesterday' is not RFC 3339"),
    (["reap_region=us-east-1", "reap_timeout=0"], {}, "reap_timeout must be a positive number"),
    ([], {"AWS_REGION": "", "AWS_DEFAULT_REGION": ""}, "No region: set reap_region"),
    (["reap_region=us-east-1", "reap_drill_id=dr-x-1", "reap_as_of=2026-11-29T05:00:00Z"], {},
     "reap_as_of judges expiry, which reap_drill_id ignores"),
    (["reap_region=us-east-1", "reap_drill_id=../etc"], {}, "reap_drill_id '../etc' is not a drill id"),
])
def test_reap_rejects_bad_input_before_touching_aws(fresh_emulator, extra_vars, env_extra, message):
    res = reap(fresh_emulator, *extra_vars, env_extra=env_extra)
    assert res.returncode != 0
    assert message in res.stdout, res.stdout[-3000:]
    assert "REAP SUMMARY" not in res.stdout


ROLE_PLAY = """
- name: Teardown role under test
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/drguard.sandbox.aws: &aws
      region: us-east-1
    drguard.sandbox.sweep: *aws
    drguard.sandbox.mint_credentials: *aws
  tasks:
    - name: Tear down
      block:
        - name: Run the role
          ansible.builtin.include_role:
            name: drguard.sandbox.teardown
          vars:
            teardown_drill_id: "{{ drill }}"
            teardown_timeout: 60
      always:
        - name: Show the fact
          ansible.builtin.debug:
            msg: "TEARDOWN_FACT {{ teardown__output | to_json | b64encode }}"
"""


def run_role(emu, tmp_path, drill: str, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    play = tmp_path / "teardown.yml"
    play.write_text(ROLE_PLAY)
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps({"drill": drill}))
    proc = subprocess.run([ANSIBLE_PLAYBOOK, str(play), "-e", "@%s" % vars_file], env=ansible_env(emu, env_extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    # base64, so that the callback cannot fold the line
    encoded = re.search(r"TEARDOWN_FACT ([A-Za-z0-9+/=]+)", proc.stdout)
    assert encoded, proc.stdout[-4000:]
    fact = json.loads(base64.b64decode(encoded.group(1)))
    return proc, fact


ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def minted_drill(emu, denied_actions: tuple = ()) -> dict:
    """A controller user (allowed everything but ``denied_actions``), a backup object and the drill's minted session,
    with IAM enforcement switched on. Returns the controller's env, the session's S3 client and the names."""
    boot = emu.client("iam")
    admin = "controller-%s" % secrets.token_hex(3)
    boot.create_user(UserName=admin)
    policy = json.loads(json.dumps(ALLOW_ALL))
    if denied_actions:
        policy["Statement"].append({"Effect": "Deny", "Action": list(denied_actions), "Resource": "*"})
    boot.put_user_policy(UserName=admin, PolicyName="controller", PolicyDocument=json.dumps(policy))
    key = boot.create_access_key(UserName=admin)["AccessKey"]
    drill = "dr-role-%s" % secrets.token_hex(3)
    bucket = "bk-" + drill
    emu.client("s3").create_bucket(Bucket=bucket)
    emu.client("s3").put_object(Bucket=bucket, Key="orders/part-0001", Body=b"row")
    emu.enforce_iam()
    minted = run_module("mint_credentials", {
        "drill_id": drill, "expires_at": "2099-01-01T00:00:00Z", "endpoint_url": emu.url, "region": "us-east-1",
        "access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"],
        "resources": {"backup": [{"bucket": bucket, "prefix": "orders/"}]}})
    assert not minted.failed, minted.get("msg")
    creds = minted["credentials"]
    session_s3 = emu.client("s3", creds["access_key_id"], creds["secret_access_key"], creds["session_token"])
    assert session_s3.get_object(Bucket=bucket, Key="orders/part-0001")["Body"].read() == b"row"
    env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    admin_iam = emu.client("iam", key["AccessKeyId"], key["SecretAccessKey"])
    return {"drill": drill, "bucket": bucket, "s3": session_s3, "env": env, "iam": admin_iam,
            "role": minted["role_name"]}


def assert_denied(call, codes: tuple = ("AccessDenied", "403", "AccessDeniedException")) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - botocore's ClientError, whatever the service
        call()
    code = getattr(info.value, "response", {}).get("Error", {}).get("Code")
    assert code in codes, info.value


def test_teardown_role_revokes_sweeps_and_reports(fresh_emulator, tmp_path):
    """The minted session works before the role runs and is denied after it; its role is gone."""
    d = minted_drill(fresh_emulator)
    try:
        tags = drill_tags(d["drill"], "2099-01-01T00:00:00Z")
        fresh_emulator.client("logs", d["env"]["AWS_ACCESS_KEY_ID"], d["env"]["AWS_SECRET_ACCESS_KEY"]) \
            .create_log_group(logGroupName="/drguard/" + d["drill"], tags=tags)
        proc, fact = run_role(fresh_emulator, tmp_path, d["drill"], d["env"])
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert fact["deleted"] == 2 and fact["remaining"] == 0 and fact["remaining_resources"] == []
        assert fact["seconds"] > 0
        # AWS denies a session whose role is gone; moto answers 500 (it cannot find the role). That revocation
        # itself denies the session is proven with the role kept: test_teardown_role_revokes_even_when_...
        assert_denied(lambda: d["s3"].get_object(Bucket=d["bucket"], Key="orders/part-0001"),
                      ("AccessDenied", "403", "AccessDeniedException", "500"))
        with pytest.raises(Exception, match="NoSuchEntity"):
            d["iam"].get_role(RoleName=d["role"])
    finally:
        fresh_emulator.relax_iam()


def test_teardown_role_revokes_even_when_the_role_cannot_be_deleted(fresh_emulator, tmp_path):
    """Revocation itself denies the session: with the role (and its policies) kept, the session is still denied,
    and the role carries the revocation policy."""
    d = minted_drill(fresh_emulator, denied_actions=("iam:DeleteRole", "iam:DeleteRolePolicy"))
    try:
        proc, fact = run_role(fresh_emulator, tmp_path, d["drill"], d["env"])
        assert proc.returncode != 0
        assert "Teardown of drill %s is incomplete" % d["drill"] in proc.stdout
        assert [(r["type"], r["id"]) for r in fact["remaining_resources"]] == [("iam_role", d["role"])]
        assert "AccessDenied" in fact["remaining_resources"][0]["reason"]
        assert_denied(lambda: d["s3"].get_object(Bucket=d["bucket"], Key="orders/part-0001"))
        names = d["iam"].list_role_policies(RoleName=d["role"])["PolicyNames"]
        assert "drguard-revoke-sessions" in names, names
        doc = d["iam"].get_role_policy(RoleName=d["role"], PolicyName="drguard-revoke-sessions")["PolicyDocument"]
        assert doc["Statement"][0]["Effect"] == "Deny" and doc["Statement"][0]["Action"] == "*"
    finally:
        fresh_emulator.relax_iam()


def test_teardown_role_fails_when_something_remains(fresh_emulator, tmp_path):
    aws = fresh_emulator.client
    drill = "dr-role-%s" % secrets.token_hex(3)
    bucket = locked_evidence_bucket(aws, drill, "2099-01-01T00:00:00Z")
    aws("sns").create_topic(Name="drguard-%s-alerts" % drill, Tags=tag_list(drill_tags(drill, "2099-01-01T00:00:00Z")))
    proc, fact = run_role(fresh_emulator, tmp_path, drill)
    assert proc.returncode != 0
    assert "Teardown of drill %s is incomplete" % drill in proc.stdout
    assert bucket in proc.stdout
    assert fact["remaining"] == 1 and fact["deleted"] == 1
    assert [(r["type"], r["id"]) for r in fact["remaining_resources"]] == [("s3_bucket", bucket)]
    assert "Object Lock" in fact["remaining_resources"][0]["reason"]
