"""The db tier's service over mutual TLS, and its leaf renewed at half-life (docs/mtls.md, "Tier services").

Root only, like the other runtime tests: real namespaces under a drill id of the test's own,
destroyed (with the drill's PKI) even when the test fails. Traffic only between namespaces the
test created.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import threading
import time
import uuid

import pytest

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls_drill
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns as netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime as runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _workloads as wl
from ansible_collections.drguard.sandbox.plugins.module_utils._probes import python_executable
from ansible_collections.drguard.sandbox.plugins.module_utils.boundary import parse_boundary
from netns_kit import needs_root_and
from netns_kit import app_db_boundary

pytestmark = needs_root_and("ip", "nft", "setpriv", "unshare", "mount")

PYTHON = python_executable()
RAW = app_db_boundary("10.216.0.0/16")
COUNT = "SELECT count(*) FROM orders"

# A client that opens one mTLS connection and keeps asking over it for argv[3] seconds: the connection
# opened before a renewal. Prints the server serial it saw and how many round trips succeeded.
HELD = r"""
import json, os, socket, sys, time
shared = {}
exec(open("/run/drguard/in/mtls_shared.py").read(), shared)
ctx = shared["client_context"]("/run/drguard/in/identity.pem", "/run/drguard/in/trust.pem")
conn = ctx.wrap_socket(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5))
serial = shared["leaf_facts"](conn.getpeercert(binary_form=True))["serial"]
reader, ok, failures = conn.makefile("rb"), 0, []
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        conn.sendall(b"SELECT count(*) FROM orders\n")
        answer = json.loads(reader.readline())
        ok += answer.get("ok") is True
    except (OSError, ValueError) as exc:
        failures.append(type(exc).__name__)
        break
    time.sleep(0.25)
print(json.dumps({"serial": serial, "round_trips": ok, "failures": failures}))
"""


def make_orders(path, rows=5):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount_cents INTEGER)")
    con.executemany("INSERT INTO orders (amount_cents) VALUES (?)", [(400,)] * rows)
    con.commit()
    con.close()


@pytest.fixture
def drill(tmp_path):
    drill_id = f"dr-dbtls-{uuid.uuid4().hex[:10]}"
    out = tmp_path / "out"
    try:
        yield drill_id, str(out)
    finally:
        netns.destroy(runtime.prefix_of(drill_id))
        _mtls_drill.destroy(drill_id)


def handshakes(out):
    return [e["data"] for e in wl.service_events(out)]


def test_the_db_service_speaks_mtls_and_authorises_by_identity_not_by_ca(drill, tmp_path):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    units = {u["tier"]: u for u in runtime.up(boundary, drill_id, out, PYTHON)["units"]}
    database = tmp_path / "orders.sqlite"
    make_orders(str(database), rows=4)
    started = wl.start_db_service(boundary, drill_id, out, str(database), python=PYTHON)
    tls = wl.client_tls(boundary, drill_id, out, "app", "db")
    assert started["tls"] == {k: tls[k] for k in ("identity", "trust", "client_id", "server_id")}
    assert started["tls"]["server_id"] == f"spiffe://{drill_id}.drguard.internal/tier/db"
    app_ns, address = units["app"]["ns"], started["address_port"]
    # The app tier with its own leaf: a round trip, and the server presents the db tier's leaf.
    answer = wl.query_db(app_ns, address, COUNT, python=PYTHON, tls=tls)
    assert (answer["ok"], answer["rows"], answer["server_serial"]) == (True, [[4]], started["serial"])
    # Plain TCP, as the service spoke before: no answer, and the service records the refused handshake.
    plain = wl.query_db(app_ns, address, COUNT, python=PYTHON)
    assert plain["ok"] is False and plain["error"] in {"closed_by_peer", "not a db service answer"}, plain
    # A leaf signed by the drill's CA whose identity tier_rules does not let reach db (validation's).
    other = wl.client_tls(boundary, drill_id, out, "validation", "db")
    refused = wl.query_db(app_ns, address, COUNT, python=PYTHON, tls=other)
    assert refused["ok"] is False
    seen = handshakes(out)
    assert [(h["accepted"], h["reason"], h["peer_id"]) for h in seen] == [
        (True, "allowed", tls["client_id"]),
        (False, seen[1]["reason"], None),
        (False, "identity_not_allowed", other["client_id"]),
    ]
    assert seen[1]["reason"] in {"protocol_version", "handshake_failed"}
    assert {h["local_tier"] for h in seen} == {"db"} and all(h["port"] == 5432 for h in seen)
    assert all(isinstance(h["latency_ms"], float) for h in seen)
    assert seen[0]["serial"] == _pki.serial_hex(_pki._load_cert(tls["identity"]))  # noqa: SLF001
    # Every event valid for the drill's collector.
    from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry  # noqa: PLC0415
    for event in wl.service_events(out, None):
        _telemetry.validate_event(event)
    # The key reaches the service as a file of its workload only: never argv, never its environment.
    with open(f"/proc/{started['pid']}/cmdline", "rb") as handle:
        cmdline = handle.read()
    with open(f"/proc/{started['pid']}/environ", "rb") as handle:
        environ = handle.read()
    assert b"PRIVATE KEY" not in cmdline and b"PRIVATE KEY" not in environ
    assert b"identity.pem" not in cmdline
    runtime.down(drill_id, out)


def test_the_db_leaf_is_renewed_at_half_life_and_open_connections_keep_working(drill, tmp_path):
    drill_id, out = drill
    boundary = parse_boundary(RAW)
    units = {u["tier"]: u for u in runtime.up(boundary, drill_id, out, PYTHON)["units"]}
    database = tmp_path / "orders.sqlite"
    make_orders(str(database), rows=2)
    started = wl.start_db_service(boundary, drill_id, out, str(database), python=PYTHON, leaf_lifetime=20)
    first = started["serial"]
    app_ns, (host, port) = units["app"]["ns"], started["address_port"].rsplit(":", 1)
    leaf = _pki.Store(drill_id, os.path.join(_mtls_drill.root_dir(drill_id), "pki")).leaf_cert("db")
    issued = leaf.not_valid_before_utc + datetime.timedelta(seconds=_pki.BACKDATE)
    assert _pki.renewal_time(leaf) == issued + datetime.timedelta(seconds=10)  # half of a 20 s leaf
    assert 0 < wl.next_renewal(drill_id, "db") <= 10.5
    # Before half-life nothing is renewed.
    assert wl.renew_db_service(boundary, drill_id, out, python=PYTHON, leaf_lifetime=20)["renewed"] is False
    tls = wl.client_tls(boundary, drill_id, out, "app", "db")
    held = {}

    def hold():
        proc = netns.run_in(app_ns, [PYTHON, "-I", "-S", "-c", HELD, host, port, "14"], timeout=40,
                            files=wl.tls_files(tls), uid=netns.workload_uid())
        held.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(1.5)  # the held connection is open before the renewal
    # The background renewer: renews at half-life, as long as asked or until the service is gone.
    renewer = wl.keep_renewed(boundary, drill_id, out, python=PYTHON, seconds=12, leaf_lifetime=20)
    holder.join()
    assert renewer["stopped"] == "time" and len(renewer["renewals"]) == 1
    second = renewer["renewals"][0]
    assert second != first
    reloads = [e["data"] for e in wl.service_events(out, wl.RELOAD_TYPE)]
    assert [(r["ok"], r["serial"]) for r in reloads] == [(True, first), (True, second)]
    # The connection opened before still round-trips, with the serial it started with.
    assert (held["serial"], held["failures"]) == (first, [])
    assert held["round_trips"] >= 20  # one every 0.25 s for 14 s, fewer on a loaded machine
    # A new handshake presents the new serial (the client with its renewed leaf).
    tls = wl.client_tls(boundary, drill_id, out, "app", "db")
    answer = wl.query_db(app_ns, started["address_port"], COUNT, python=PYTHON, tls=tls)
    assert (answer["ok"], answer["server_serial"]) == (True, second)
    assert all(h["accepted"] for h in handshakes(out))
    # The renewer stops when the service is gone (teardown).
    runtime.down(drill_id, out)
    gone = wl.keep_renewed(boundary, drill_id, out, python=PYTHON, seconds=30, leaf_lifetime=20)
    assert gone == {"renewals": [], "stopped": "service_gone"}
