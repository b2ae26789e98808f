"""The ec2 restore and validation's pure parts: the shell lines sent, and how their output is judged (fail closed)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime_ec2_restore as er
from ansible_collections.drguard.sandbox.plugins.module_utils._workloads import Caps

SHA_A, SHA_B = "a" * 64, "b" * 64
ARTIFACTS = [
    {"name": "db/orders.sqlite", "verified": True, "sha256": SHA_A, "size": 20480, "kind": "sqlite",
     "source": "s3://backups/prod/orders.sqlite", "version_id": "v1"},
    {"name": "files.tar.gz", "verified": True, "sha256": SHA_B, "size": 100, "source": "s3://backups/prod/files.tgz",
     "version_id": "v2"},
]
TO = {"host": "s3.eu-west-1.amazonaws.com", "port": 443, "scheme": "https", "netloc": "s3.eu-west-1.amazonaws.com"}


def _res(stdout, status="Success"):
    return {"instance_id": "i-0abc", "command_id": "c-1", "status": status, "response_code": 0, "stdout": stdout,
            "stderr": ""}


def _ok_output(items, **change):
    lines = [json.dumps(dict({"i": n, "size": i["size"], "sha256": i["sha256"]}, **(change if n == 0 else {})))
             for n, i in enumerate(items)]
    return "\n".join(lines + [json.dumps({"done": True})]) + "\n"


def test_a_clean_output_gives_the_restored_entries_on_the_instance():
    items = er.checked_artifacts(ARTIFACTS)
    out = er.parse_restore_output(_res(_ok_output(items)), items)
    assert out == [
        {"name": "db/orders.sqlite", "path": "/run/drguard/restore/db/orders.sqlite", "sha256": SHA_A, "size": 20480,
         "on_instance": True, "kind": "sqlite"},
        {"name": "files.tar.gz", "path": "/run/drguard/restore/files.tar.gz", "sha256": SHA_B, "size": 100,
         "on_instance": True}]


@pytest.mark.parametrize("change, reason", [
    ({"size": 20479}, "db/orders.sqlite: the bytes restored on the validation instance differ from what was verified "
                      "(size 20479, sha256 %s; verified 20480, %s)" % (SHA_A, SHA_A)),
    ({"sha256": "c" * 64}, "db/orders.sqlite: the bytes restored on the validation instance differ from what was "
                           "verified (size 20480, sha256 %s; verified 20480, %s)" % ("c" * 64, SHA_A)),
    ({"error": "ValueError: S3 answered 403 AccessDenied"}, "the validation instance could not restore "
                                                            "db/orders.sqlite: ValueError: S3 answered 403 "
                                                            "AccessDenied (SSM command c-1 on i-0abc ended Success)"),
])
def test_a_size_or_digest_other_than_verified_or_an_error_line_fails(change, reason):
    items = er.checked_artifacts(ARTIFACTS)
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.parse_restore_output(_res(_ok_output(items, **change)), items)
    assert str(exc.value) == reason


def test_a_missing_artifact_line_is_no_result_naming_it():
    items = er.checked_artifacts(ARTIFACTS)
    lines = _ok_output(items).splitlines()
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.parse_restore_output(_res("\n".join([lines[0], lines[2]])), items)
    assert str(exc.value).startswith("no result for artifact files.tar.gz from the validation instance (SSM command "
                                     "c-1 on i-0abc ended Success)")


@pytest.mark.parametrize("stdout, status", [
    ("", "Success"),  # the emulator: Success, nothing printed
    ("", "unknown"),  # no final status in time
    (None, "Success"),
])
def test_no_output_or_no_final_status_is_no_result(stdout, status):
    items = er.checked_artifacts(ARTIFACTS)
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.parse_restore_output(_res(stdout, status), items)
    assert str(exc.value).startswith("no result for artifact db/orders.sqlite")
    assert "ended %s" % status in str(exc.value)


def test_every_line_but_no_end_mark_or_another_status_fails():
    items = er.checked_artifacts(ARTIFACTS)
    no_end = "\n".join(_ok_output(items).splitlines()[:2])
    for stdout, status in ((no_end, "Success"), (_ok_output(items), "Failed")):
        with pytest.raises(er.Ec2RestoreError) as exc:
            er.parse_restore_output(_res(stdout, status), items)
        assert str(exc.value) == ("no result: the restore on the validation instance did not end cleanly (SSM "
                                  "command c-1 on i-0abc ended %s)" % status)


@pytest.mark.parametrize("garbage", ["Traceback (most recent call last):", "[1, 2]", "{not json"])
def test_garbage_in_the_output_fails_and_nothing_is_trusted(garbage):
    items = er.checked_artifacts(ARTIFACTS)
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.parse_restore_output(_res(garbage + "\n" + _ok_output(items)), items)
    assert str(exc.value).startswith("the validation instance printed something that is not a result")


def test_a_local_source_is_refused_naming_the_artifact():
    local = dict(ARTIFACTS[1], source="/mnt/backup/files.tgz")
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.checked_artifacts([ARTIFACTS[0], local])
    assert str(exc.value) == ("artifact 'files.tar.gz' comes from the local source /mnt/backup/files.tgz, which the "
                              "ec2 runtime's validation instance cannot read; restore from S3 or choose "
                              "drill_runtime.backend netns")


@pytest.mark.parametrize("entry, reason", [
    (dict(ARTIFACTS[0], verified=False), "artifact 'db/orders.sqlite' was not verified; refusing to restore it"),
    (dict(ARTIFACTS[0], name="../etc/x"), "artifact name '../etc/x' is unsafe"),
    (dict(ARTIFACTS[0], sha256=None), "artifact 'db/orders.sqlite' lacks sha256, size or source"),
])
def test_bad_entries_are_refused_before_anything(entry, reason):
    with pytest.raises(Exception) as exc:
        er.checked_artifacts([entry])
    assert str(exc.value) == reason


def test_the_commands_carry_the_session_secret_by_name_and_stay_well_under_the_ssm_limit():
    items = er.checked_artifacts(ARTIFACTS)
    lines = er.restore_commands("drguard/dr-x/runtime/session", "eu-west-1", er.restore_request(items, TO,
                                                                                                 "eu-west-1"),
                                fresh=True, size=1 << 20)
    text = json.dumps(lines)
    assert "--secret-id drguard/dr-x/runtime/session" in text
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()
    # measured: the restore command (s3_relay + driver + request) and the validation command (workloads + driver)
    assert er.commands_size(lines) < 16 * 1024
    request = er.validate_request(er.parse_restore_output(_res(_ok_output(items)), items), 1, Caps(), extract=True)
    assert er.commands_size(er.validate_commands(request, 1 << 20)) < 32 * 1024
    # the workload runs unprivileged with an empty environment
    assert [ln for ln in lines if "drguard_ec2.py" in ln and "restore" in ln][0].count(
        "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all") == 1


def test_batches_keep_each_command_within_its_output_and_size_budget():
    items = [{"rel": "f%d" % n, "key": "k" * 500} for n in range(250)]
    runs = er.batches(items)
    assert [len(r) for r in runs] == [38] * 6 + [22] and sum(runs, []) == items
    assert [len(r) for r in er.batches(items[:5], limit=2)] == [2, 2, 1]


def test_validation_results_are_parsed_and_anything_else_fails():
    entries = [{"name": "db/orders.sqlite", "rel": "db/orders.sqlite"}]
    good = {"valid": True, "results": [{"name": "db/orders.sqlite", "kind": "sqlite", "valid": True, "detail": "ok"}]}
    assert er.parse_validate_output(_res(json.dumps(good)), entries) == good["results"]
    for stdout, status, why in (("", "Success", "no result"), (json.dumps(good), "unknown", "no result"),
                                (json.dumps({"error": "caps too small"}), "Failed", "caps too small")):
        with pytest.raises(er.Ec2RestoreError) as exc:
            er.parse_validate_output(_res(stdout, status), entries)
        assert str(exc.value) == ("validation on the validation instance failed: %s (SSM command c-1 on i-0abc "
                                  "ended %s)" % (why, status))
    other = {"valid": True, "results": [{"name": "other", "valid": True}]}
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.parse_validate_output(_res(json.dumps(other)), entries)
    assert str(exc.value).startswith("validation on the validation instance answered for ['other'] where "
                                     "['db/orders.sqlite'] were asked")


def test_the_user_commands_exit_mark_is_required():
    assert er.parse_user_output(_res("all good\n\ndrguard-command-exit 0\n")) == (0, "all good")
    assert er.parse_user_output(_res("boom\n\ndrguard-command-exit 3\n", "Failed")) == (3, "boom")
    for stdout, status in (("", "Success"), ("drguard-command-exit 0", "unknown"), ("drguard-command-exit x",
                                                                                     "Success")):
        with pytest.raises(er.Ec2RestoreError) as exc:
            er.parse_user_output(_res(stdout, status))
        assert str(exc.value).startswith("no result: the validation command on the validation instance did not "
                                         "report its exit code")


def test_a_restored_entry_not_on_the_instance_is_refused_for_validation():
    with pytest.raises(er.Ec2RestoreError) as exc:
        er.validate_request([{"name": "x", "path": "/tmp/x"}], 1, Caps(), extract=True)
    assert str(exc.value).startswith("restored entry 'x' is not a file restored on the validation instance")


def test_a_script_is_handed_in_only_as_a_small_regular_file(tmp_path):
    good = tmp_path / "check.py"
    good.write_text("print('ok')\n")
    assert er.script_of(str(good)) == ("check.py", b"print('ok')\n")
    link = tmp_path / "link.py"
    link.symlink_to(good)
    big = tmp_path / "big.py"
    big.write_bytes(b"#" * (16 * 1024 + 1))
    for path, start in ((link, "script %s cannot be read" % link),
                        (big, "script %s is larger than 16384 bytes" % big),
                        (tmp_path / "a b.sh", "script %r needs a plain file name" % str(tmp_path / "a b.sh"))):
        with pytest.raises(er.Ec2RestoreError) as exc:
            er.script_of(str(path))
        assert str(exc.value).startswith(start)
