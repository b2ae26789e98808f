"""Restore validation inside the sandbox (docs/runtime.md, "Restore and validation inside").

Root only, like the other runtime tests: real namespaces, each test under a prefix or drill id
of its own, destroyed even when the test fails. Traffic only goes between namespaces the test
created.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns

_MISSING = [tool for tool in ("ip", "nft", "setpriv", "unshare", "mount") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or bool(_MISSING),
    reason=(
        "network namespaces need root and ip/nft/setpriv/unshare/mount on PATH "
        f"(euid {os.geteuid()}, missing: {', '.join(_MISSING) or 'nothing'}); make venv as root installs them"
    ),
)

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by any uid

# What a workload sees of its private files: each name, owner, mode, content; whether it can write.
LOOK = r"""
import json, os, sys
root = "/run/drguard/in"
seen = {}
for name in sorted(os.listdir(root)):
    st = os.stat(os.path.join(root, name))
    with open(os.path.join(root, name), "rb") as handle:
        seen[name] = {"uid": st.st_uid, "mode": oct(st.st_mode & 0o777), "data": handle.read().decode()}
try:
    open(os.path.join(root, "new"), "w")
    writable = "yes"
except OSError as exc:
    writable = exc.strerror
mounts = [line.split()[1] for line in open("/proc/self/mounts") if line.split()[1].startswith("/run")]
print(json.dumps({"files": seen, "writable": writable, "cwd": os.getcwd(), "uid": os.getuid(),
                  "mounts": mounts,
                  "env": dict(v.split("=", 1) for v in open("/proc/self/environ").read().split("\0") if v)}))
"""


@pytest.fixture
def prefix():
    value = f"drg-t{uuid.uuid4().hex[:5]}-"
    try:
        yield value
    finally:
        netns.destroy(value)


@pytest.fixture
def tier(prefix):
    plan = {"router": {"ns": f"{prefix}router"},
            "tiers": {"app": {"ns": f"{prefix}app", "veth_host": f"{prefix}1r", "veth_peer": f"{prefix}1t",
                              "subnet": "10.251.1.0/24", "address": "10.251.1.2", "gateway": "10.251.1.1"}}}
    netns.create(plan)
    return plan["tiers"]["app"]["ns"]


def host_mounts():
    with open("/proc/self/mounts", encoding="utf-8") as handle:
        return handle.read()


def test_files_are_given_read_only_in_a_private_tmpfs_owned_by_the_workload(tier, tmp_path):
    source = tmp_path / "orders.sqlite"
    source.write_text("restored bytes")
    before = host_mounts()
    out = netns.run_in(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", LOOK],
                       files={"orders.sqlite": {"source": str(source)},
                              "token": {"data": "s3cr3t-value", "mode": 0o600},
                              "check.py": {"data": "print(1)", "mode": 0o444}})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["files"] == {
        "orders.sqlite": {"uid": 65534, "mode": "0o400", "data": "restored bytes"},
        "token": {"uid": 65534, "mode": "0o600", "data": "s3cr3t-value"},
        "check.py": {"uid": 65534, "mode": "0o444", "data": "print(1)"},
    }
    assert seen["writable"] == "Read-only file system"
    assert seen["cwd"] == "/run/drguard/in"
    assert seen["uid"] == 65534
    assert seen["env"] == {}
    # Nothing of it on the host: no mount, no directory, the host's /run untouched.
    assert host_mounts() == before
    assert not os.path.exists("/run/drguard")


def test_scratch_is_a_writable_directory_capped_in_size(tier):
    code = ("import os\n"
            "path = '/run/drguard/work/big'\n"
            "with open(path, 'wb') as h:\n"
            "    h.write(b'x' * 100_000)\n"
            "try:\n"
            "    with open(path + '2', 'wb') as h:\n"
            "        h.write(b'x' * 4_000_000)\n"
            "        h.flush()\n"
            "    print('no cap')\n"
            "except OSError as exc:\n"
            "    print(exc.strerror)\n")
    out = netns.run_in(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", code], files={"a": {"data": "x"}},
                       scratch=1_000_000)
    assert out.stdout.strip() == "No space left on device", out.stderr


def test_a_secret_given_as_a_file_is_not_in_argv_environment_or_the_host(tier):
    secret = "tok-" + uuid.uuid4().hex
    code = "import time, sys; print('ready', flush=True); time.sleep(30)"
    pid = netns.spawn(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", code], files={"token": {"data": secret, "mode": 0o600}})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
            if not cmdline.startswith(b"/usr/sbin/ip") and b"unshare" not in cmdline and b"setpriv" not in cmdline:
                break  # the workload itself, past ip netns exec, the prelude and setpriv
            time.sleep(0.05)
        assert cmdline.split(b"\0")[:2] == [SYSTEM_PYTHON.encode(), b"-I"]
        assert secret.encode() not in cmdline
        with open(f"/proc/{pid}/environ", "rb") as handle:
            assert secret.encode() not in handle.read()
        # The prelude handed it over through memory only: no file on the host's disks holds it.
        assert not any(secret in line for line in host_mounts().splitlines())
    finally:
        netns.destroy(tier[: -len("app")])


@pytest.mark.parametrize(("files", "reason"), [
    ({"../x": {"data": "a"}}, "plain file name"),
    ({"a": {"data": "a", "mode": 0o777}}, "mode must be one of"),
    ({"a": {"source": "relative"}}, "absolute path"),
    ({"a": {}}, "needs either source"),
])
def test_bad_files_are_refused_before_anything_runs(tier, files, reason):
    with pytest.raises(netns.NetnsError) as err:
        netns.run_in(tier, ["true"], files=files)
    assert reason in err.value.msg and err.value.detail["field"] == "files"


def test_a_symlinked_source_is_refused(tier, tmp_path):
    real = tmp_path / "real"
    real.write_text("x")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(netns.NetnsError) as err:
        netns.run_in(tier, ["true"], files={"a": {"source": str(tmp_path / "link")}})
    assert "not a regular file" in err.value.msg


def test_a_workload_with_a_uid_of_its_own_is_out_of_reach_of_other_workloads(tier):
    secret = "tok-" + uuid.uuid4().hex
    uid = netns.workload_uid()
    code = "import time; time.sleep(30)"
    pid = netns.spawn(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", code], uid=uid, env={"TOKEN": secret},
                      files={"token": {"data": secret, "mode": 0o600}})
    deadline, status = time.monotonic() + 10, ""
    while time.monotonic() < deadline and f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" not in status:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            status = handle.read()
        time.sleep(0.05)
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status  # the workload itself, past the prelude
    # Another workload of the same tier (uid 65534, like every listener) tries its environment and its files.
    thief = ("import sys\n"
             "for path in sys.argv[1:]:\n"
             "    try:\n"
             "        open(path, 'rb').read()\n"
             "        print('read')\n"
             "    except OSError as exc:\n"
             "        print(exc.strerror)\n")
    out = netns.run_in(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", thief, f"/proc/{pid}/environ",
                              f"/proc/{pid}/root/run/drguard/in/token"])
    assert out.stdout.split("\n")[:2] == ["Permission denied", "Permission denied"], out.stdout + out.stderr
