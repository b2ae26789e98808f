"""Restore validation inside the sandbox (docs/runtime.md, "Restore and validation inside").

Root only, like the other runtime tests: real namespaces, each test under a prefix or drill id
of its own, destroyed even when the test fails. Traffic only goes between namespaces the test
created.
"""

from __future__ import annotations

import json
import os
import io
import shutil
import sqlite3
import tarfile
import time
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _workloads as wl
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import Caps
from ansible_collections.drguard.sandbox.plugins.module_utils._restore import validate
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import SYSTEM_PYTHON
from netns_kit import app_db_boundary

pytestmark = needs_root_and("ip", "nft", "setpriv", "unshare", "mount")

PYTHON = python_executable()
RAW = app_db_boundary("10.214.0.0/16")

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
    """The host's mount table, without the namespace files other tests (and engineers) add and remove meanwhile."""
    with open("/proc/self/mounts", encoding="utf-8") as handle:
        return "".join(line for line in handle if " /run/netns/" not in line)


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
    assert "drguard" not in host_mounts()
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
            wrapped = cmdline.startswith(b"/usr/sbin/ip") or b"unshare" in cmdline or b"setpriv" in cmdline
            if cmdline and not wrapped:
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



def make_orders(path, rows=5):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount_cents INTEGER)")
    con.executemany("INSERT INTO orders (amount_cents) VALUES (?)", [(100 * i,) for i in range(1, rows + 1)])
    con.commit()
    con.close()
    os.chmod(path, 0o400)


def add(tar, name, data=b"x", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def restored_set(directory):
    """A good SQLite (with expectations), a good tar.gz, a tar with '..', a corrupt gzip, raw bytes, a symlink."""
    directory.mkdir(mode=0o700)
    make_orders(str(directory / "orders.sqlite"))
    with tarfile.open(directory / "files.tar.gz", "w:gz") as tar:
        add(tar, "etc/app.conf", b"key=value\n")
        add(tar, "data/blob", b"y" * 5000)
    with tarfile.open(directory / "evil.tar", "w") as tar:
        add(tar, "../escape", b"boom")
    good = (directory / "files.tar.gz").read_bytes()
    (directory / "broken.tar.gz").write_bytes(good[:40])
    (directory / "notes.bin").write_bytes(b"\x00\x01 just bytes")
    (directory / "link.sqlite").symlink_to(directory / "orders.sqlite")
    names = ["orders.sqlite", "files.tar.gz", "evil.tar", "broken.tar.gz", "notes.bin", "link.sqlite"]
    entries = [{"name": n, "path": str(directory / n)} for n in names]
    entries[0]["expect"] = {"tables": {"orders": 5}}
    entries[0]["kind"] = "sqlite"
    return entries


def test_validators_inside_give_the_controllers_results(tier, tmp_path):
    entries = restored_set(tmp_path / "restore")
    caps = Caps(max_members=10, max_total_bytes=1_000_000, max_ratio=200)
    here = validate(entries, 1, caps)
    inside = wl.validate_inside(tier, entries, 1, caps, python=PYTHON)
    assert inside.results == here.results
    assert inside.valid is here.valid is False
    by_name = {r["name"]: r for r in inside.results}
    assert by_name["orders.sqlite"]["valid"] and by_name["orders.sqlite"]["tables"] == {"orders": 5}
    assert by_name["files.tar.gz"]["valid"] and by_name["files.tar.gz"]["members"] == 2
    assert "climbs out of the target" in by_name["evil.tar"]["detail"]
    assert "truncated or corrupt" in by_name["broken.tar.gz"]["detail"]
    assert "symlink" in by_name["link.sqlite"]["detail"]
    # Nothing was extracted on the controller's side.
    assert sorted(os.listdir(tmp_path / "restore")) == sorted(e["name"] for e in entries)


def test_the_caps_hold_inside_the_tier(tier, tmp_path, monkeypatch):
    entries = restored_set(tmp_path / "restore")[1:2]
    monkeypatch.setattr(wl, "SCRATCH_SLACK", 0)
    inside = wl.validate_inside(tier, entries, 1, Caps(max_total_bytes=1000), python=PYTHON)
    assert inside.valid is False
    assert inside.results[0]["detail"] == ("tar member 'data/blob' would bring the unpacked size past "
                                           "max_total_bytes 1000")


@pytest.fixture
def drill(tmp_path):
    drill_id = f"dr-inside-{uuid.uuid4().hex[:10]}"
    out = tmp_path / "out"
    yield drill_id, str(out)
    netns.destroy(runtime.prefix_of(drill_id))
    _mtls_drill.destroy(drill_id)  # the drill's PKI, which the runtime made for its collector


def test_the_db_service_answers_the_app_tier_over_the_tier_rule_and_refuses_the_rest(drill, tmp_path):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    built = runtime.up(boundary, drill_id, out, PYTHON)
    units = {u["tier"]: u for u in built["units"]}
    database = tmp_path / "orders.sqlite"
    make_orders(str(database), rows=7)
    started = wl.start_db_service(boundary, drill_id, out, str(database), python=PYTHON)
    assert (started["changed"], started["tier"], started["client_tier"], started["address_port"]) == (
        True, "db", "app", f"{units['db']['address']}:5432")
    tls = wl.client_tls(boundary, drill_id, out, "app", "db")
    # The declared topology: app reaches db over the tier rule (over mTLS, with the app tier's leaf).
    answer = wl.query_db(units["app"]["ns"], started["address_port"], "SELECT count(*), sum(amount_cents) FROM orders",
                         python=PYTHON, tls=tls)
    assert answer == {"ok": True, "columns": ["count(*)", "sum(amount_cents)"], "rows": [[7, 2800]],
                      "truncated": False, "server_serial": started["serial"]}
    # The validation tier has no tier rule towards db: the same query never arrives.
    refused = wl.query_db(units["validation"]["ns"], started["address_port"], "SELECT 1", python=PYTHON, timeout=1,
                          tls=wl.client_tls(boundary, drill_id, out, "validation", "db"))
    assert refused == {"ok": False, "error": "unreachable: timed out"}
    # Only a single read-only SELECT is answered.
    for sql, reason in [("DELETE FROM orders", "only a single SELECT is answered"),
                        ("SELECT 1; DELETE FROM orders", "refused: You can only execute one statement at a time."),
                        ("SELECT * FROM pragma_table_info('orders')", "refused: not authorized"),
                        ("SELECT load_extension('x')", "refused: not authorized")]:
        got = wl.query_db(units["app"]["ns"], started["address_port"], sql, python=PYTHON, tls=tls)
        assert (got["ok"], got["error"]) == (False, reason), sql
    assert wl.query_db(units["app"]["ns"], started["address_port"], "SELECT count(*) FROM orders",
                       python=PYTHON, tls=tls)["rows"] == [[7]]
    # The tier's other listeners still serve (the undeclared port still answers inside the tier).
    state = runtime.read_state_file(out)
    assert state["processes"][wl.SERVICE_KEY]["pid"] == started["pid"]
    assert runtime._alive(netns, units["db"]["ns"], state["processes"][f"listeners:{units['db']['ns']}"]["pid"])
    # Idempotent, and the runtime itself still counts as complete.
    assert wl.start_db_service(boundary, drill_id, out, str(database), python=PYTHON)["changed"] is False
    assert runtime.up(boundary, drill_id, out, PYTHON)["changed"] is False
    removed = runtime.down(drill_id, out)
    assert started["pid"] in removed["removed"]["pids"]


def test_validate_restore_module_runs_the_validators_inside(tier, tmp_path):
    from conftest import run_module  # noqa: PLC0415

    entries = restored_set(tmp_path / "restore")
    good = [entries[0], entries[1]]
    result = run_module("validate_restore", {"restored": good, "namespace": tier})
    assert (result.failed, result["valid"], result["inside"]) == (False, True, tier)
    assert result["results"] == validate(good).results
    bad = run_module("validate_restore", {"restored": entries, "namespace": tier})
    assert bad.failed and bad["results"] == validate(entries).results
    assert bad["msg"].startswith("Restored backup does not validate: evil.tar (tar member '../escape' climbs out")
    refused = run_module("validate_restore", {"restored": good, "namespace": tier, "keep_extracted": True})
    assert refused.failed and refused["msg"].startswith("keep_extracted cannot be used with namespace")
    outside = run_module("validate_restore", {"restored": good, "namespace": "eth0"})
    assert outside.failed and "is not a drill namespace" in outside["msg"]


def test_runtime_service_module_check_mode_start_and_idempotence(drill, tmp_path):
    from conftest import run_module  # noqa: PLC0415

    drill_id, out = drill
    runtime.up(parse_boundary(RAW), drill_id, out, PYTHON)
    database = tmp_path / "orders.sqlite"
    make_orders(str(database))
    args = {"drill_id": drill_id, "boundary": RAW, "output_dir": out, "database": str(database)}
    planned = run_module("runtime_service", args, check_mode=True)
    assert (planned.failed, planned["changed"], planned["pid"], planned["client_tier"]) == (False, True, None, "app")
    started = run_module("runtime_service", args)
    assert (started.failed, started["changed"], started["tier"], started["port"]) == (False, True, "db", 5432)
    again = run_module("runtime_service", args)
    assert (again["changed"], again["pid"]) == (False, started["pid"])
    assert run_module("runtime_service", args, check_mode=True)["changed"] is False
    wrong = run_module("runtime_service", dict(args, port=5433))
    assert wrong.failed
    assert wrong["msg"] == "port 5433 is not declared by the tier rule app -> db; pick one of its ports."


CHECK_ORDERS = os.path.join(os.path.dirname(__file__), "..", "..", "playbooks", "files", "check_orders.py")

# Run next to the user's command: what a workload inside can see of secrets and of the controller.
SNOOP = r"""
import json, os, sys
token = open(os.path.join(os.environ["DRGUARD_SECRETS_DIR"], "api-token")).read()
tries = {}
for path in sys.argv[1:]:
    try:
        open(path, "rb").read(1)
        tries[path] = "read"
    except OSError as exc:
        tries[path] = exc.strerror
print(json.dumps({
    "token_in_cmdline": token in open("/proc/self/cmdline").read(),
    "env_names": sorted(os.environ),
    "tries": tries,
}))
# A careless command: the secrets in its output, plain and base64 (secret_exec redacts both).
import base64
print("careless", token, base64.b64encode(token.encode()).decode(), os.environ["ORDERS_DB_CREDENTIALS"])
print("careless", token, file=sys.stderr)
"""


@pytest.fixture
def secrets_store(module_runner):
    from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets as sec  # noqa: PLC0415

    drill_id = f"dr-sec-{uuid.uuid4().hex[:10]}"
    token = "ghp_" + uuid.uuid4().hex + "abcd"
    args = {"drill_id": drill_id, "expires_at": "2099-01-01T00:00:00Z", "store": "tmpfs",
            "masking_key": "k" * 32,
            "secrets": [{"name": "orders-db", "kind": "synthetic_db"},
                        {"name": "api-token", "kind": "masked", "value": token}]}
    created = module_runner("drill_secrets", args)
    assert not created.failed, created.get("msg")
    values = {n: sec.read_secret_file(created["tmpfs_dir"], n) for n in ("orders-db", "api-token")}
    yield drill_id, values
    module_runner("drill_secrets", {"drill_id": drill_id, "state": "absent", "store": "tmpfs"})


def test_the_users_command_in_the_app_tier_reaches_the_db_over_the_tier_rule_not_from_validation(
        drill, tmp_path, module_runner, secrets_store, monkeypatch):
    drill_id, out = drill
    store_id, values = secrets_store
    boundary = parse_boundary(RAW)
    built = runtime.up(boundary, drill_id, out, PYTHON)
    units = {u["tier"]: u for u in built["units"]}
    database = tmp_path / "orders.sqlite"
    make_orders(str(database), rows=3)
    service = wl.start_db_service(boundary, drill_id, out, str(database), python=PYTHON)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "controller-secret-key")
    # As phase validate hands them in: the app tier's leaf and the drill's CA bundle as files, named by variables.
    tls_env = {"DRGUARD_TLS_CERT": "/run/drguard/in/tls-identity.pem",
               "DRGUARD_TLS_KEY": "/run/drguard/in/tls-identity.pem",
               "DRGUARD_TLS_CA": "/run/drguard/in/tls-ca.pem", "DRGUARD_TLS_SERVER_ID": service["tls"]["server_id"]}
    args = {"drill_id": store_id, "store": "tmpfs", "argv": [PYTHON, "check_orders.py"],
            "files": {"check_orders.py": os.path.abspath(CHECK_ORDERS), "tls-identity.pem": service["tls"]["identity"],
                      "tls-ca.pem": service["tls"]["trust"]},
            "env": dict(tls_env, DRGUARD_DB_ADDRESS=service["address_port"]),
            "env_secrets": {"ORDERS_DB_CREDENTIALS": "orders-db"}, "file_secrets": {"api-token": "api-token"}}
    ok = module_runner("secret_exec", dict(args, namespace=units["app"]["ns"]))
    assert not ok.failed, (ok.get("msg"), ok.get("stdout"), ok.get("stderr"))
    assert ok["inside"] == units["app"]["ns"]
    assert ok["stdout"].strip() == (f"orders: 3 rows, 600 cents (db tier {service['address_port']} over mTLS); "
                                    "login as synthetic user ok; token shape ok")
    # Its files, the tier's private key among them, are the workload's own and readable by it alone.
    look = ("import json, os; d = '/run/drguard/in'; print(json.dumps({n: [oct(os.stat(os.path.join(d, n)).st_mode "
            "& 0o7777), os.stat(os.path.join(d, n)).st_uid == os.getuid()] for n in sorted(os.listdir(d))}))")
    modes = module_runner("secret_exec", dict(args, namespace=units["app"]["ns"], argv=[PYTHON, "-I", "-c", look]))
    assert not modes.failed, modes.get("stderr")
    assert json.loads(modes["stdout"]) == {"check_orders.py": ["0o400", True], "tls-ca.pem": ["0o400", True],
                                           "tls-identity.pem": ["0o400", True], "api-token": ["0o600", True]}
    # Without its leaf (the variables still set, the files not given) the command cannot reach the db.
    bare = module_runner("secret_exec", dict(args, namespace=units["app"]["ns"],
                                             files={"check_orders.py": os.path.abspath(CHECK_ORDERS)}))
    assert bare.failed and bare["stdout"].strip() == (
        f"cannot query the db service at {service['address_port']}: [Errno 2] No such file or directory")
    # The command as it was written before (plain TCP, no TLS variables): the service never answers it.
    plain = module_runner("secret_exec", dict(args, namespace=units["app"]["ns"],
                                              env={"DRGUARD_DB_ADDRESS": service["address_port"]}))
    assert plain.failed and plain["stdout"].strip() == (
        f"cannot query the db service at {service['address_port']}: 'DRGUARD_TLS_CA'")
    # The same command from the validation tier: no tier rule towards db, the query never arrives.
    refused = module_runner("secret_exec", dict(args, namespace=units["validation"]["ns"]))
    assert refused.failed and refused["rc"] == 1
    assert refused["stdout"].strip() == f"cannot query the db service at {service['address_port']}: timed out"
    # No secret in argv, in the module's results or the controller's credentials inside.
    other = tmp_path / "other-drill" / "out"
    other.mkdir(parents=True, mode=0o700)
    (other / "report.json").write_text("another drill's")
    os.chmod(other.parent, 0o700)
    snoop = module_runner("secret_exec", dict(args, argv=[PYTHON, "-I", "-c", SNOOP, f"/proc/{os.getpid()}/environ",
                                                          str(other / "report.json"), "/root/.npmrc"],
                                              namespace=units["app"]["ns"]))
    assert not snoop.failed, snoop.get("stderr")
    seen = json.loads(snoop["stdout"].splitlines()[0])
    assert snoop["stdout"].splitlines()[1] == "careless ******** ******** ********"
    assert snoop["stderr"].strip() == "careless ********"
    assert seen["token_in_cmdline"] is False
    assert seen["env_names"] == sorted(["AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_SHARED_CREDENTIALS_FILE",
                                        "DRGUARD_DB_ADDRESS", "DRGUARD_SECRETS_DIR", "HOME", "LANG",
                                        "ORDERS_DB_CREDENTIALS", "PATH", *tls_env])
    # The controller's process and its home: refused; another drill's output under /tmp: not even there
    # (the workload has a /tmp of its own).
    assert seen["tries"] == {f"/proc/{os.getpid()}/environ": "Permission denied",
                             str(other / "report.json"): "No such file or directory",
                             "/root/.npmrc": "Permission denied"}
    for result in (ok, refused, snoop):
        dumped = json.dumps(dict(result))
        for value in values.values():
            assert value not in dumped
        assert "controller-secret-key" not in dumped


def test_the_runtimes_leftovers_proof_counts_a_live_db_service(drill, tmp_path):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    runtime.up(boundary, drill_id, out, PYTHON)
    database = tmp_path / "orders.sqlite"
    make_orders(str(database))
    pid = wl.start_db_service(boundary, drill_id, out, str(database), python=PYTHON)["pid"]
    assert runtime.leftovers(runtime.prefix_of(drill_id), [pid])["processes"] == [pid]
    runtime.down(drill_id, out)
    assert runtime.leftovers(runtime.prefix_of(drill_id), [pid])["processes"] == []


def test_a_workload_with_files_gets_private_temporary_directories(tier, tmp_path):
    marker = f"drguard-host-{uuid.uuid4().hex}"
    with open(os.path.join("/tmp", marker), "w") as handle:  # noqa: S108 - the host's own /tmp, on purpose
        handle.write("host")
    os.chmod(os.path.join("/tmp", marker), 0o644)  # noqa: S108
    written = f"drguard-workload-{uuid.uuid4().hex}"
    code = ("import os, sys\n"
            "seen = {d: sorted(os.listdir(d)) for d in ('/tmp', '/var/tmp', '/dev/shm')}\n"
            "for d in seen:\n"
            "    open(os.path.join(d, sys.argv[1]), 'w').write('x')\n"
            "print(sum(len(v) for v in seen.values()))\n")
    try:
        out = netns.run_in(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", code, written], files={"a": {"data": "x"}})
        assert (out.returncode, out.stdout.strip()) == (0, "0"), out.stderr
        for directory in ("/tmp", "/var/tmp", "/dev/shm"):  # noqa: S108
            assert not os.path.exists(os.path.join(directory, written))
    finally:
        os.unlink(os.path.join("/tmp", marker))  # noqa: S108


def test_a_workload_with_files_sees_the_rest_of_the_host_read_only(tier):
    shared = f"/var/lib/drguard-test-{uuid.uuid4().hex[:8]}"
    os.mkdir(shared)
    os.chmod(shared, 0o1777)  # noqa: S103 - world-writable on the host: still not for a workload
    code = ("import os, sys\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        open(path, 'w').write('x')\n"
            "        print('written')\n"
            "    except OSError as exc:\n"
            "        print(exc.strerror)\n")
    try:
        out = netns.run_in(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", code, f"{shared}/x", "/tmp/x", "/dev/null",
                                  "/run/drguard/work/x"], files={"a": {"data": "x"}}, scratch=4096)
        assert out.stdout.split("\n")[:4] == ["Read-only file system", "written", "written", "written"], out.stderr
        assert os.listdir(shared) == []
        # Without files (the runtime's own listeners and probes) nothing changes.
        plain = netns.run_in(tier, [SYSTEM_PYTHON, "-I", "-S", "-c", code, f"{shared}/y"])
        assert plain.stdout.strip() == "written"
    finally:
        shutil.rmtree(shared)
