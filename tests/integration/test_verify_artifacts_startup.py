"""verify_artifacts in a process of its own, started the way a play starts it (AnsiballZ's loader).

What only a fresh process shows: which libraries a verification imports. A local backup set
(no S3 location, no KMS key) is verified without ever importing the AWS SDK (boto3, botocore,
s3transfer) or amazon.aws' botocore helpers, whose import is most of a module's start-up; an
S3 backup set imports them and verifies as before. Both runs go through the same loader as
``bench/artifact_bench.py``, so the packaging of the lazy imports is exercised too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from emulator import child_env
from helpers_artifacts import artifacts_for
from helpers_artifacts import create_locked_bucket
from helpers_artifacts import generate_key
from helpers_artifacts import make_statement
from helpers_artifacts import sample_files
from helpers_artifacts import sign_statement
from helpers_artifacts import unique
from helpers_artifacts import upload_set
from helpers_artifacts import write_local_set
from helpers_artifacts import write_trust_policy

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".collections"
SDK = ("boto3", "botocore", "s3transfer", "ansible_collections.amazon.aws.plugins.module_utils.botocore",
       "ansible_collections.amazon.aws.plugins.module_utils.modules",
       "ansible_collections.drguard.sandbox.plugins.module_utils._aws")

# The module run by AnsiballZ's own loader (as in a play); at exit the child writes the names of
# the modules it imported to argv[3]. The result is the last line of stdout.
CHILD = r"""
import atexit, json, sys
sys.path.insert(0, sys.argv[2])
def dump():
    with open(sys.argv[3], "w") as handle:
        json.dump(sorted(sys.modules), handle)
atexit.register(dump)
from ansible.module_utils._internal._ansiballz._loader import run_module
with open(sys.argv[1], "rb") as handle:
    params = b'{"ANSIBLE_MODULE_ARGS": ' + handle.read() + b'}'
run_module(json_params=params, profile="legacy", module_fqn="ansible_collections.drguard.sandbox.plugins.modules."
           "verify_artifacts", modlib_path=sys.argv[2], extensions={})
"""


def run_child(tmp_path, args: dict, env: dict | None = None):
    """(result, imported module names, stdout) of one verify_artifacts process."""
    args_path = tmp_path / ("args-%s.json" % unique())
    args_path.write_text(json.dumps(args))
    modules_path = tmp_path / ("modules-%s.json" % unique())
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args_path), str(COLLECTIONS), str(modules_path)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    lines = proc.stdout.strip().splitlines()
    assert lines, "no output; stderr: %s" % proc.stderr[-2000:]
    return json.loads(lines[-1]), set(json.loads(modules_path.read_text())), proc.stdout + proc.stderr


def sdk_loaded(modules: set) -> list:
    return sorted(m for m in SDK if m in modules)


@pytest.fixture
def local_set(tmp_path):
    key = generate_key("ed25519")
    files = sample_files(unique())
    root = write_local_set(str(tmp_path / "set"), files)
    policy = write_trust_policy(str(tmp_path / "trust.json"), [key])
    manifest = tmp_path / "manifest.dsse.json"
    manifest.write_bytes(sign_statement(make_statement(unique("set"), 3, artifacts_for(files)), [key]))
    return {"manifest": str(manifest), "source": root, "trust_policy": policy, "files": files}


def local_args(local_set, **extra):
    args = {k: v for k, v in local_set.items() if k != "files"}
    args.update(extra)
    return args


def no_aws_env():
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("AWS_"):
            env.pop(name)
    return env


@pytest.mark.parametrize("workers", [1, 2])
def test_local_set_verifies_without_importing_the_aws_sdk(tmp_path, local_set, workers):
    result, modules, out = run_child(tmp_path, local_args(local_set, workers=workers), no_aws_env())
    assert result.get("verified") is True, out[-2000:]
    assert result["bytes_hashed"] == sum(len(b) for b in local_set["files"].values())
    assert sdk_loaded(modules) == []


def test_local_failure_is_reported_without_importing_the_aws_sdk(tmp_path, local_set):
    path = os.path.join(local_set["source"], "files.tar")
    data = bytearray(Path(path).read_bytes())
    data[100] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    result, modules, out = run_child(tmp_path, local_args(local_set), no_aws_env())
    assert result.get("failed") is True and result["verified"] is False, out[-2000:]
    assert [(f["name"], f["reason"]) for f in result["failures"]] == [("files.tar", "digest_mismatch")]
    assert sdk_loaded(modules) == []


def test_local_set_censors_credentials_given_to_it(tmp_path, local_set):
    """The AWS options are still accepted and validated, and credentials never appear in the output."""
    secrets_given = {"access_key": "AKIA" + unique("k").replace("-", "").upper(),
                     "secret_key": "s3cr3t-" + unique(), "session_token": "t0ken-" + unique()}
    result, modules, out = run_child(tmp_path, local_args(local_set, region="eu-west-1", **secrets_given),
                                     no_aws_env())
    assert result.get("verified") is True, out[-2000:]
    for value in secrets_given.values():
        assert value not in out
    assert sdk_loaded(modules) == []


def test_local_set_refuses_an_invalid_aws_option_as_the_aws_module_does(tmp_path, local_set):
    result, _modules, out = run_child(tmp_path, local_args(local_set, validate_certs="maybe"), no_aws_env())
    assert result.get("failed") is True and result.get("verified") is not True, out[-2000:]
    assert "validate_certs" in result["msg"]


def test_s3_set_imports_the_sdk_and_verifies(tmp_path, emulator, aws):
    s3 = aws("s3")
    key = generate_key("ed25519")
    bucket = create_locked_bucket(s3)
    prefix = unique("set") + "/"
    files = sample_files(unique())
    versions = upload_set(s3, bucket, prefix, files)
    data = sign_statement(make_statement(unique("set"), 3, artifacts_for(files, versions)), [key])
    s3.put_object(Bucket=bucket, Key="manifests/" + prefix.strip("/") + ".json", Body=data,
                  ChecksumAlgorithm="SHA256")
    args = {"manifest": "s3://%s/manifests/%s.json" % (bucket, prefix.strip("/")),
            "source": "s3://%s/%s" % (bucket, prefix),
            "trust_policy": write_trust_policy(str(tmp_path / "trust.json"), [key])}
    result, modules, out = run_child(tmp_path, args, child_env(emulator.url))
    assert result.get("verified") is True, out[-2000:]
    assert {a["name"]: a["version_id"] for a in result["artifacts"]} == versions
    assert {"boto3", "botocore"} <= modules


def test_local_set_with_botocore_endpoint_logs_reports_no_aws_action(tmp_path, local_set):
    """debug_botocore_endpoint_logs lists the AWS actions made: none for a local set, and the SDK stays unloaded."""
    result, modules, out = run_child(tmp_path, local_args(local_set, debug_botocore_endpoint_logs=True), no_aws_env())
    assert result.get("verified") is True, out[-2000:]
    assert result["resource_actions"] == []
    assert sdk_loaded(modules) == []
