"""A drill on the ec2 runtime backend, end to end on the emulator.

The emulator accepts SSM SendCommand but runs no command, so every probe row is ``unknown``: the
drill must build the instances (and the runtime's own instance profile and role), read them back
(runtime_verify finds nothing wrong), halt at the probes with an alert before any backup is read,
exit non-zero and tear everything down (instances terminated, profile and role deleted, the SSM
endpoints gone). Nothing of this needs root: no namespace is made.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import ROOT, ansible_env
from drillkit import ANSIBLE_PLAYBOOK, emulator_session, remaining, run_drill


def test_ec2_drill_builds_the_instances_halts_at_unknown_probes_and_tears_down(world, tmp_path):
    run = run_drill(world, tmp_path, extra={"drill_runtime": {"backend": "ec2"}})
    assert run.rc != 0, run.stdout[-3000:]
    report = run.report
    assert report["outcome"] == "halted" and report["failed_phase"] == "probes", report.get("error")
    assert [p["name"] for p in report["phases"]] == ["network", "prove", "runtime", "probes", "teardown"]
    assert report["artifacts"] is None

    runtime = report["runtime"]
    assert runtime["backend"] == "ec2" and runtime["prefix"] == "drguard-%s-" % run.drill_id
    tiers = [u["tier"] for u in runtime["units"]]
    assert tiers[-1] == "validation" and all(u["address"] for u in runtime["units"])
    # the live instances read back match what the runtime launches: the verifier finds nothing
    assert (runtime["isolated"], runtime["findings"]) == (True, [])
    # no command ran: every row is unknown, and every row is a violation (fail closed)
    rows = runtime["probes"]
    assert rows and {r["observed"] for r in rows} == {"unknown"}
    assert {r["src"] for r in rows} == set(tiers)
    assert runtime["violations"] == len(rows)

    alerts = [json.loads(line) for line in (run.output_dir / "alerts.jsonl").read_text().splitlines()]
    assert [a["type"] for a in alerts] == ["drguard.boundary.violated"]
    assert {v["code"] for v in alerts[0]["data"]["violations"]} == {"probe_failed"}
    assert len(alerts[0]["data"]["violations"]) == len(rows)
    # no instance confirmed its certificate bundle (no command ran): a reason to halt of its own
    assert alerts[0]["data"]["undelivered_certificates"] == tiers
    assert "%d tier(s) without a confirmed certificate" % len(tiers) in report["error"]

    # teardown: nothing of the drill remains
    assert report["teardown"]["remaining"] == 0
    assert remaining(world.emu, run.drill_id) == []
    session = emulator_session()
    ec2 = session.client("ec2", endpoint_url=world.emu.url)
    iam = session.client("iam", endpoint_url=world.emu.url)
    instances = [i for r in ec2.describe_instances(Filters=[{"Name": "tag:drguard:drill-id",
                                                               "Values": [run.drill_id]}])["Reservations"]
                 for i in r["Instances"]]
    assert len(instances) == len(tiers)
    assert {i["State"]["Name"] for i in instances} == {"terminated"}
    name = "drguard-%s-runtime" % run.drill_id
    assert name not in [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]]
    assert name not in [r["RoleName"] for r in iam.list_roles(PathPrefix="/drguard/")["Roles"]]
    endpoints = [e for e in ec2.describe_vpc_endpoints()["VpcEndpoints"]
                 if {"Key": "drguard:drill-id", "Value": run.drill_id} in (e.get("Tags") or [])
                 and e.get("State", "").lower() not in ("deleted",)]
    assert endpoints == []
    sm = session.client("secretsmanager", endpoint_url=world.emu.url)
    assert not [s for s in sm.list_secrets()["SecretList"] if s["Name"].startswith("drguard/%s/" % run.drill_id)]
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:drguard:drill-id", "Values": [run.drill_id]}])["Vpcs"]
    assert vpcs == []


@pytest.mark.parametrize("validation, reason", [
    ({"argv": ["/bin/true"], "env_secrets": {"DB_PASSWORD": "db-password"}, "file_secrets": {}},
     "drill_validation.env_secrets and file_secrets cannot be delivered to the ec2 runtime's validation instance"),
    (None, "artifact 'a.txt' comes from the local source /mnt/backup/a.txt, which the ec2 runtime's validation "
           "instance cannot read"),
])
def test_the_restore_phase_on_ec2_refuses_what_it_cannot_do_before_anything(world, tmp_path, validation, reason):
    # On the emulator the probes halt every ec2 drill first; this runs the phase file on its own.
    play = [{"hosts": "localhost", "gather_facts": False,
             "vars": {"_drill_args": {"runtime": {"backend": "ec2"}, "validation": validation},
                      "drill_ctx": {"drill_id": "dr-ec2-phase-1", "output_dir": str(tmp_path)},
                      "drill_verify_result": {"artifacts": [{"name": "a.txt", "verified": True, "sha256": "0" * 64,
                                                             "size": 1, "source": "/mnt/backup/a.txt"}]}},
             "tasks": [{"ansible.builtin.include_tasks": str(ROOT / "playbooks" / "phases" / "restore.yml")}]}]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play))
    proc = subprocess.run([ANSIBLE_PLAYBOOK, str(path)], env=ansible_env(world.emu), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert reason in proc.stdout, proc.stdout[-2000:]
