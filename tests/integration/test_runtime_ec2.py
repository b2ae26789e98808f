"""sandbox_runtime backend ec2 against the emulator, as far as the API goes.

The emulator starts no real machine and runs no SSM command (SendCommand is accepted and every
invocation answers ``Success`` with empty output): the instances' attributes, idempotence,
teardown and the fail-closed reading of commands are tested here; what runs on an instance is not.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from datetime import timedelta
from datetime import timezone

from conftest import run_module

from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary

# In the future: the runtime's CA is valid until the drill expires.
EXPIRES = (datetime.now(timezone.utc) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
CONTRACT = {"drguard:managed": "true", "drguard:expires-at": EXPIRES}
EC2_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
BOUNDARY = {
    "production_cidrs": ["10.0.0.0/16"],
    "egress": [{"cidr": "198.51.100.0/28", "protocol": "tcp", "ports": [4317], "kind": "telemetry"}],
    "tiers": ["app", "db"],
    "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
    "ssm_endpoints": True,
}


def _drill_id(tag: str) -> str:
    return "t-%s-%s" % (tag, uuid.uuid4().hex[:10])


def _role(iam, drill_id: str, trust=None, owner=None) -> str:
    name = "drguard-%s" % drill_id
    iam.create_role(RoleName=name, Path="/drguard/", AssumeRolePolicyDocument=json.dumps(trust or EC2_TRUST),
                    Tags=[{"Key": "drguard:managed", "Value": "true"},
                          {"Key": "drguard:drill-id", "Value": owner or drill_id},
                          {"Key": "drguard:expires-at", "Value": EXPIRES}])
    return name


def _world(aws, tag: str, role: bool = True, **boundary):
    drill_id = _drill_id(tag)
    raw = dict(BOUNDARY, **boundary)
    net = run_module("sandbox_network", {"drill_id": drill_id, "boundary": raw, "expires_at": EXPIRES,
                                         "flow_logs": False})
    assert not net.failed, net.get("msg")
    if role:
        _role(aws("iam"), drill_id)
    return drill_id, raw, net


def _role_names(iam) -> list:
    return [r["RoleName"] for r in iam.list_roles(PathPrefix="/drguard/")["Roles"]]


def _instances(ec2, drill_id: str) -> list:
    res = ec2.describe_instances(Filters=[{"Name": "tag:drguard:drill-id", "Values": [drill_id]}])
    return [i for r in res["Reservations"] for i in r["Instances"] if i["State"]["Name"] != "terminated"]


def test_one_instance_per_tier_private_imdsv2_profile_subnet_group_tags_and_idempotent(aws_env, aws):
    ec2, iam = aws("ec2"), aws("iam")
    drill_id, raw, net = _world(aws, "ec2up")
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    assert (res["changed"], res["backend"]) == (True, "ec2")
    assert [u["tier"] for u in res["units"]] == ["app", "db", "validation"]
    profile = iam.get_instance_profile(InstanceProfileName="drguard-%s-runtime" % drill_id)["InstanceProfile"]
    assert profile["Path"] == "/drguard/" and [r["RoleName"] for r in profile["Roles"]] == [
        "drguard-%s-runtime" % drill_id]
    assert {t["Key"]: t["Value"] for t in profile["Tags"]} == dict(CONTRACT, **{"drguard:drill-id": drill_id})
    live = {i["InstanceId"]: i for i in _instances(ec2, drill_id)}
    assert sorted(live) == sorted(u["instance_id"] for u in res["units"])
    for n, unit in enumerate(res["units"]):
        inst = live[unit["instance_id"]]
        assert inst["State"]["Name"] == "running"
        assert "PublicIpAddress" not in inst and not any((e.get("Association") or {}).get("PublicIp")
                                                         for e in inst["NetworkInterfaces"])
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        assert inst["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert inst["IamInstanceProfile"]["Arn"] == profile["Arn"]
        assert inst["SubnetId"] == net["subnet_ids"][n % 2] == unit["subnet_id"]
        # the interface's groups (the emulator leaves the instance's own SecurityGroups empty)
        assert [[g["GroupId"] for g in e["Groups"]] for e in inst["NetworkInterfaces"]] == [
            [net["security_groups"][unit["tier"]]]]
        assert inst["PrivateIpAddress"] == unit["address"]
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags == dict(CONTRACT, **{"drguard:drill-id": drill_id, "Name": "drguard-%s-%s" % (drill_id,
                                                                                                  unit["tier"])})
    # the expiry came from the drill's VPC; a second run finds everything and changes nothing
    again = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert (again.failed, again["changed"], again["actions"]) == (False, False, [])
    assert again["units"] == res["units"]
    assert len(_instances(ec2, drill_id)) == 3
    # check mode of the removal changes nothing
    plan = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"}, check_mode=True)
    assert plan["changed"] is True and len(_instances(ec2, drill_id)) == 3
    gone = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})
    assert (gone.failed, gone["changed"]) == (False, True)
    assert sorted(gone["removed"]["instances"]) == sorted(live)
    assert _instances(ec2, drill_id) == []
    assert "drguard-%s-runtime" % drill_id not in [p["InstanceProfileName"]
                                                   for p in iam.list_instance_profiles()["InstanceProfiles"]]
    assert "drguard-%s-runtime" % drill_id not in _role_names(iam)
    assert run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})[
        "changed"] is False


def test_sweep_of_the_drill_leaves_no_instance_or_profile(aws_env, aws):
    ec2, iam = aws("ec2"), aws("iam")
    drill_id, raw, _ = _world(aws, "ec2sweep")
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    swept = run_module("sweep", {"drill_id": drill_id})
    assert not swept.failed, swept.get("msg")
    assert _instances(ec2, drill_id) == []
    names = [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]]
    assert "drguard-%s-runtime" % drill_id not in names
    left = ec2.describe_vpcs(Filters=[{"Name": "tag:drguard:drill-id", "Values": [drill_id]}])["Vpcs"]
    assert left == []


def test_refused_before_any_instance_without_declared_endpoints_or_a_usable_role(aws_env, aws):
    ec2, iam = aws("ec2"), aws("iam")
    # no ssm_endpoints in the boundary: one sentence, no AWS call creates anything
    drill_id = _drill_id("ec2nossm")
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2",
                                         "boundary": dict(BOUNDARY, ssm_endpoints=False)})
    assert res["msg"] == ("sandbox_runtime: the ec2 runtime is reached through SSM interface endpoints, which the "
                          "boundary does not declare; set drill_boundary.ssm_endpoints true and build the network "
                          "again.")
    # a network built without the endpoints is refused too
    plain = _drill_id("ec2plain")
    assert not run_module("sandbox_network", {"drill_id": plain, "boundary": dict(BOUNDARY, ssm_endpoints=False),
                                              "expires_at": EXPIRES, "flow_logs": False}).failed
    _role(iam, plain)
    res = run_module("sandbox_runtime", {"drill_id": plain, "backend": "ec2", "boundary": BOUNDARY})
    assert "needs the network built with drill_boundary.ssm_endpoints true" in res["msg"], res["msg"]
    # a role that EC2 cannot assume, and another drill's role
    drill_id, raw, _ = _world(aws, "ec2trust")
    controller = {"AWS": "arn:aws:iam::123456789012:root"}
    iam.update_assume_role_policy(RoleName="drguard-%s" % drill_id, PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": controller,
                                                "Action": "sts:AssumeRole"}]}))
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw,
                                         "ec2": {"instance_role": "drguard-%s" % drill_id}})
    assert res["msg"] == ("sandbox_runtime: the instance role drguard-%s does not trust ec2.amazonaws.com, so its "
                          "instances would get no credentials; let the drill's role trust ec2.amazonaws.com "
                          "(sts:AssumeRole)." % drill_id)
    other = _role(iam, _drill_id("other"), owner="someone-else")
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw,
                                         "ec2": {"instance_role": other}})
    assert "is not drill %s's (its drguard:drill-id tag is 'someone-else')" % drill_id in res["msg"]
    for d in (drill_id, plain):
        assert _instances(ec2, d) == [] and "drguard-%s-runtime" % d not in _role_names(iam)
        assert "drguard-%s-runtime" % d not in [p["InstanceProfileName"]
                                                for p in iam.list_instance_profiles()["InstanceProfiles"]]


def test_an_instance_that_drifted_is_refused_not_used(aws_env, aws):
    ec2 = aws("ec2")
    drill_id, raw, _ = _world(aws, "ec2drift")
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    app = res["units"][0]["instance_id"]
    ec2.modify_instance_metadata_options(InstanceId=app, HttpTokens="optional")
    again = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert again.failed
    assert again["problems"] == ["IMDSv2 is not required (HttpTokens optional)"]
    assert again["msg"].startswith("sandbox_runtime: instance %s (drguard-%s-app) is not what the runtime launches"
                                   % (app, drill_id))
    run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})


def test_send_command_is_accepted_and_probes_on_the_emulator_are_unknown_never_a_pass(aws_env, aws):
    ssm = aws("ssm")
    drill_id, raw, _ = _world(aws, "ec2probe")
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    units = res["units"]
    ids = [u["instance_id"] for u in units]
    out = _runtime_ec2.run_command(ssm, ids, ["echo hello"], timeout=5, poll=0.1)
    assert [o["instance_id"] for o in out] == ids
    command = ssm.list_commands(CommandId=out[0]["command_id"])["Commands"][0]
    assert command["DocumentName"] == "AWS-RunShellScript" and command["Parameters"]["commands"] == ["echo hello"]
    assert set(ids) <= set(command["InstanceIds"])  # the emulator lists more instances than were named
    # the emulator answers Success with no output: nothing ran, so no probe may read as observed
    rows = _runtime_ec2.probe_matrix(parse_boundary(raw), units)
    assert {(r["src"], r["dst"], r["expected"]) for r in rows} >= {
        ("app", "production", "deny"), ("app", "telemetry", "allow"), ("app", "db", "allow"),
        ("validation", "production", "deny")}
    result = _runtime_ec2.run_probes(ssm, rows, units, command_timeout=5, poll=0.1)
    assert {r["observed"] for r in result["rows"]} == {"unknown"}
    assert result["summary"]["unknown"] == len(rows) and result["summary"]["allow"] == 0
    assert {v["code"] for v in result["violations"]} == {"probe_failed"}
    assert len(result["violations"]) == len(rows)
    assert "with no probe result in its output" in result["rows"][0]["reason"]
    # the command itself drops every privilege before python runs
    sent = ssm.list_commands()["Commands"]
    probe_cmds = [c for c in sent if c.get("Comment") == "drguard probes"]
    assert len(probe_cmds) >= 3
    for c in probe_cmds:
        assert c["Parameters"]["commands"][0].split("| ", 2)[2].startswith(
            "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --ambient-caps=-all "
            "--bounding-set=-all --no-new-privs -- env -i /usr/bin/python3 -I -S -c")
    run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})


def test_run_command_without_a_final_status_in_time_is_unknown():
    class Pending:
        def send_command(self, **kw):
            return {"Command": {"CommandId": "c-1"}}

        def get_command_invocation(self, **kw):
            return {"Status": "InProgress"}

    ticks = iter(range(0, 1000))
    out = _runtime_ec2.run_command(Pending(), ["i-1"], ["true"], timeout=3, poll=1, sleep=lambda s: None,
                                   clock=lambda: next(ticks))
    assert out == [{"instance_id": "i-1", "command_id": "c-1", "status": "unknown", "response_code": None,
                    "stdout": "", "stderr": ""}]


def test_check_mode_plans_and_creates_nothing(aws_env, aws):
    ec2, iam = aws("ec2"), aws("iam")
    drill_id, raw, _ = _world(aws, "ec2check")
    plan = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw}, check_mode=True)
    assert not plan.failed, plan.get("msg")
    assert plan["changed"] is True
    name = "drguard-%s-runtime" % drill_id
    assert plan["actions"][:4] == ["create role %s" % name, "put policy drguard-runtime of role %s" % name,
                                   "create instance profile %s" % name,
                                   "add role %s to instance profile %s" % (name, name)]
    assert [a.split(" in ")[0] for a in plan["actions"][4:7]] == [
        "launch instance drguard-%s-%s" % (drill_id, t) for t in ("app", "db", "validation")]
    assert plan["actions"][7:] == ["put the %s tier's certificate in secret drguard/%s/runtime/%s" % (t, drill_id, t)
                                   for t in ("app", "db", "validation")]
    assert plan["certificates"] == []
    assert _instances(ec2, drill_id) == []
    assert "drguard-%s-runtime" % drill_id not in [p["InstanceProfileName"]
                                                   for p in iam.list_instance_profiles()["InstanceProfiles"]]
    assert "drguard-%s-runtime" % drill_id not in _role_names(iam)


SSM_AGENT_ACTIONS = sorted([
    "ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel", "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage", "ec2messages:FailMessage", "ec2messages:GetEndpoint", "ec2messages:GetMessages",
    "ec2messages:SendReply"])


def test_the_runtime_makes_its_own_least_privilege_instance_role_and_removes_it(aws_env, aws):
    ec2, iam = aws("ec2"), aws("iam")
    # no minted role exists yet: the runtime phase runs before the identity phase
    drill_id, raw, _ = _world(aws, "ec2role", role=False)
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    name = "drguard-%s-runtime" % drill_id
    assert res["instance_role"] == name
    role = iam.get_role(RoleName=name)["Role"]
    assert role["Path"] == "/drguard/"
    assert role["AssumeRolePolicyDocument"]["Statement"] == [{
        "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    tags = {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=name)["Tags"]}
    assert tags == dict(CONTRACT, **{"drguard:drill-id": drill_id})
    assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == ["drguard-runtime"]
    doc = iam.get_role_policy(RoleName=name, PolicyName="drguard-runtime")["PolicyDocument"]
    stmts = doc["Statement"]
    agent = [s for s in stmts if s["Sid"] == "SsmAgent"][0]
    assert sorted(agent["Action"]) == SSM_AGENT_ACTIONS and agent["Resource"] == "*"
    # one statement per tier: its own secret only, only for credentials of that tier's instance
    account = role["Arn"].split(":")[4]
    region = ec2.meta.region_name
    assert stmts[1:] == [{
        "Sid": "TierSecrets%d" % n, "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
        "Resource": ["arn:aws:secretsmanager:%s:%s:secret:drguard/%s/runtime/%s-??????" % (region, account, drill_id,
                                                                                           name_)
                     for name_ in ([unit["tier"]] + (["session"] if unit["tier"] == "validation" else []))],
        "Condition": {"ArnEquals": {"ec2:SourceInstanceARN": "arn:aws:ec2:%s:%s:instance/%s" % (
            region, account, unit["instance_id"])}}} for n, unit in enumerate(res["units"])]
    assert len(stmts) == 4
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    # idempotent: the second run changes nothing
    again = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert (again.failed, again["changed"], again["actions"]) == (False, False, [])
    # a widened policy is put back
    iam.put_role_policy(RoleName=name, PolicyName="drguard-runtime", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    fixed = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert fixed["actions"] == ["put policy drguard-runtime of role %s" % name]
    doc = iam.get_role_policy(RoleName=name, PolicyName="drguard-runtime")["PolicyDocument"]
    assert sorted(s["Sid"] for s in doc["Statement"]) == ["SsmAgent", "TierSecrets0", "TierSecrets1", "TierSecrets2"]
    gone = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})
    assert not gone.failed, gone.get("msg")
    assert gone["removed"]["instance_role"] == name
    assert name not in _role_names(iam) and _instances(ec2, drill_id) == []


def test_sweep_finds_the_runtime_role_of_a_killed_drill(aws_env, aws):
    iam = aws("iam")
    drill_id, raw, _ = _world(aws, "ec2rolesweep", role=False)
    assert not run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw}).failed
    swept = run_module("sweep", {"drill_id": drill_id})
    assert not swept.failed, swept.get("msg")
    assert "drguard-%s-runtime" % drill_id not in _role_names(iam)
    assert "drguard-%s-runtime" % drill_id not in [p["InstanceProfileName"]
                                                   for p in iam.list_instance_profiles()["InstanceProfiles"]]
    assert "drguard-%s-runtime" % drill_id not in _role_names(iam)


def _verify(drill_id, raw):
    return run_module("runtime_verify", {"drill_id": drill_id, "boundary": raw, "backend": "ec2",
                                         "fail_on_findings": False})


def test_runtime_verify_reads_the_instances_back_and_reports_each_drift(aws_env, aws):
    ec2, iam = aws("ec2"), aws("iam")
    drill_id, raw, net = _world(aws, "ec2verify", role=False)
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    clean = _verify(drill_id, raw)
    assert not clean.failed, clean.get("msg")
    assert (clean["isolated"], clean["findings"], clean["changed"]) == (True, [], False)
    assert clean["checked"] == {"instances": 3, "instance_profiles": 1, "roles": 1}
    assert clean["prefix"] == "drguard-%s-" % drill_id
    app, db, validation = (u["instance_id"] for u in res["units"])
    # drift, each kind once: IMDSv1 allowed, a second group, a missing tier, a widened role, a stray instance
    ec2.modify_instance_metadata_options(InstanceId=app, HttpTokens="optional")
    extra = ec2.create_security_group(GroupName="drguard-%s-extra" % drill_id, Description="x",
                                      VpcId=net["vpc_id"])["GroupId"]
    eni = [i for i in _instances(ec2, drill_id) if i["InstanceId"] == db][0]["NetworkInterfaces"][0]
    ec2.modify_network_interface_attribute(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                           Groups=[net["security_groups"]["db"], extra])
    ec2.terminate_instances(InstanceIds=[validation])
    iam.put_role_policy(RoleName="drguard-%s-runtime" % drill_id, PolicyName="drguard-runtime",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    drifted = _verify(drill_id, raw)
    assert drifted["isolated"] is False
    assert sorted((f["code"], f["resource"]) for f in drifted["findings"]) == sorted([
        ("runtime_instance_imds", "%s (drguard-%s-app)" % (app, drill_id)),
        ("runtime_instance_security_group", "%s (drguard-%s-db)" % (db, drill_id)),
        ("runtime_instance_missing", "drguard-%s-validation" % drill_id),
        ("runtime_instance_role", "drguard-%s-runtime" % drill_id),
    ])
    failing = run_module("runtime_verify", {"drill_id": drill_id, "boundary": raw, "backend": "ec2"})
    assert failing.failed and failing["msg"].startswith("the runtime of drill %s is not isolated: 4 finding(s)"
                                                        % drill_id)
    run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})
    ec2.delete_security_group(GroupId=extra)


def test_runtime_verify_without_the_runtime_is_a_finding_never_a_pass(aws_env, aws):
    drill_id, raw, _ = _world(aws, "ec2noruntime", role=False)
    res = _verify(drill_id, raw)
    assert res["isolated"] is False
    assert sorted(f["code"] for f in res["findings"]) == ["runtime_instance_missing"] * 3 + [
        "runtime_instance_profile", "runtime_instance_role"]
    # no network at all: unreadable
    res = _verify(_drill_id("ec2nonet"), raw)
    assert [f["code"] for f in res["findings"]] == ["runtime_unreadable"]


def test_runtime_probe_ec2_sends_the_matrix_through_ssm_and_fails_closed_on_unknown(aws_env, aws):
    ec2, ssm = aws("ec2"), aws("ssm")
    drill_id, raw, _ = _world(aws, "ec2rprobe", role=False)
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    plan = run_module("runtime_probe", {"drill_id": drill_id, "boundary": raw, "backend": "ec2"}, check_mode=True)
    assert not plan.failed, plan.get("msg")
    expected = _runtime_ec2.probe_matrix(parse_boundary(raw), res["units"])
    assert plan["rows"] == expected and plan["summary"]["rows"] == len(expected)
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    out = run_module("runtime_probe", {"drill_id": drill_id, "boundary": raw, "backend": "ec2",
                                       "command_timeout": 5})
    assert out.failed
    assert out["msg"].startswith("the runtime of drill %s violates the boundary: %d violation(s) (probe_failed)"
                                 % (drill_id, len(expected)))
    assert {r["observed"] for r in out["rows"]} == {"unknown"}
    assert out["summary"] == {"rows": len(expected), "allow": 0, "deny": 0, "unknown": len(expected),
                              "violations": len(expected)}
    sent = [c for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before
            and c.get("Comment") == "drguard probes"]
    assert len(sent) == 3  # one command per tier instance
    # a tier whose instance is gone: its rows are unknown without any command
    validation = res["units"][2]["instance_id"]
    ec2.terminate_instances(InstanceIds=[validation])
    out = run_module("runtime_probe", {"drill_id": drill_id, "boundary": raw, "backend": "ec2",
                                       "command_timeout": 5})
    gone = [r for r in out["rows"] if r["src"] == "validation"]
    assert gone and {r["reason"] for r in gone} == {"no result (no instance for this tier)"}
    run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})


def test_tier_certificates_go_through_the_secret_store_never_in_commands_or_results(aws_env, aws):
    from cryptography import x509

    sm, ssm = aws("secretsmanager"), aws("ssm")
    drill_id, raw, _ = _world(aws, "ec2certs", role=False)
    before = {c["CommandId"] for c in ssm.list_commands()["Commands"]}
    res = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert not res.failed, res.get("msg")
    assert "PRIVATE KEY" not in json.dumps(res)
    certs = res["certificates"]
    assert [c["tier"] for c in certs] == ["app", "db", "validation"]
    cas = set()
    for cert, unit in zip(certs, res["units"], strict=True):
        assert cert["secret"] == "drguard/%s/runtime/%s" % (drill_id, unit["tier"])
        stored = json.loads(sm.get_secret_value(SecretId=cert["secret"])["SecretString"])
        assert sorted(stored) == ["ca_bundle", "cert", "key"] and "PRIVATE KEY" in stored["key"]
        leaf = x509.load_pem_x509_certificate(stored["cert"].encode())
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        assert uris == ["spiffe://%s.drguard.internal/tier/%s" % (drill_id, unit["tier"])]
        assert cert["serial"] == "%X" % leaf.serial_number
        cas.add(stored["ca_bundle"])
        tags = {t["Key"]: t["Value"] for t in sm.describe_secret(SecretId=cert["secret"])["Tags"]}
        assert tags == dict(CONTRACT, **{"drguard:drill-id": drill_id})
        # the emulator runs no command: the delivery is not confirmed, never assumed
        assert cert["delivered"] is False and cert["reason"].startswith("SSM command ")
    assert len(cas) == 1
    sent = [c for c in ssm.list_commands()["Commands"] if c["CommandId"] not in before
            and c.get("Comment") == "drguard certificates"]
    assert len(sent) == 3
    for c in sent:
        text = json.dumps(c["Parameters"])
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
        assert "drguard/%s/runtime/" % drill_id in text
    # check mode sends no command
    count = len(ssm.list_commands()["Commands"])
    plan = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw}, check_mode=True)
    assert (plan["changed"], len(ssm.list_commands()["Commands"])) == (False, count)
    assert {c["delivered"] for c in plan["certificates"]} == {None}
    # a second run re-issues nothing
    again = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "boundary": raw})
    assert (again["changed"], again["actions"]) == (False, [])
    assert [c["serial"] for c in again["certificates"]] == [c["serial"] for c in certs]
    gone = run_module("sandbox_runtime", {"drill_id": drill_id, "backend": "ec2", "state": "absent"})
    assert sorted(gone["removed"]["secrets"]) == sorted(c["secret"] for c in certs)
    names = [s["Name"] for s in sm.list_secrets()["SecretList"]]
    assert not [n for n in names if n.startswith("drguard/%s/" % drill_id)]
