# Copyright: drguard maintainers
# Apache License 2.0
"""mTLS inside a drill's netns runtime: the backend of ``drguard.sandbox.runtime_mtls`` (docs/mtls.md).

One call does the whole phase:

1. the drill's PKI (``_pki.Store``: a CA and a leaf per tier, leaves past half-life renewed) under
   ``/dev/shm/drguard-<drill id>-mtls/pki`` and each tier's identity and trust delivered into a
   directory of its own beside it (0700, the workloads' uid);
2. in every tier that is the destination of a TCP tier rule, the mTLS echo server (``_mtls``)
   takes the rule's ports from the runtime's plain listener, which is restarted without them
   (the l4 probes have run by then); the runtime's ``state.json`` records the servers;
3. handshake probes (rows of layer ``mtls``): every allowed pair with a round trip, and the
   refusals (no client certificate, another drill's CA, expired, an identity ``tier_rules`` does
   not allow, outside the trust domain signed by the drill CA, wrong EKU, cA true), each judged
   by the server's own handshake event;
4. a forced leaf rotation with a connection held open (``dropped_connections``, new handshakes
   with the new serials, zero failed handshakes), the rotated-out leaf refused; a CA rotation
   with the overlap bundle, then the new CA only: the old CA's leaf refused;
5. every server event (``drguard.tls.handshake``, ``drguard.tls.reload``) sent to the drill's
   collector; the servers stopped and the plain listener restored as it was.

Results carry serials, fingerprints, expiry and identities, never key material.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import stat
import time

from ansible_collections.drguard.sandbox.plugins.module_utils import _mtls
from ansible_collections.drguard.sandbox.plugins.module_utils import _netns
from ansible_collections.drguard.sandbox.plugins.module_utils import _pki
from ansible_collections.drguard.sandbox.plugins.module_utils import _runtime
from ansible_collections.drguard.sandbox.plugins.module_utils import _secrets
from ansible_collections.drguard.sandbox.plugins.module_utils import _telemetry

SERVER_KEY = "mtls:"  # state.json processes: mtls:<tier>
READY = 10.0  # seconds a server (and a restored listener) has to bind its ports
EVENT_WAIT = 3.0  # seconds a server has to write the event of a probe's handshake
SOAK_SECONDS = 3.0


class MtlsDrillError(Exception):
    """The phase could not run; ``msg`` is one sentence."""

    def __init__(self, msg, **detail):
        super().__init__(msg)
        self.msg = msg
        self.detail = detail


def root_dir(drill_id: str) -> str:
    """``/dev/shm/drguard-<drill id>-mtls``: the PKI (``pki/``, 0700) and the tiers' delivery directories."""
    return _secrets.default_tmpfs_dir(drill_id).rstrip("/") + "-mtls"


def destroy(drill_id: str) -> bool:
    """Overwrite and remove the drill's PKI (CA keys included) and every delivered identity; True when it existed."""
    return _pki.destroy(root_dir(drill_id))


def _uid():
    return (_netns.UNPRIVILEGED_UID, _netns.UNPRIVILEGED_GID) if os.geteuid() == 0 else (None, None)


def _wait(predicate, timeout, step=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return

    def gone():
        _netns._reap()  # noqa: SLF001 - collect it when this process started it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    if not _wait(gone, 10.0, 0.02):
        raise MtlsDrillError("process %d did not exit after SIGKILL; check it and run teardown." % pid)


class Phase:
    """The mTLS phase of one drill (see the module docstring)."""

    def __init__(self, boundary, drill_id, output_dir, *, python, ttl, leaf_lifetime=_pki.DEFAULT_LEAF_LIFETIME,
                 telemetry=None, inject_allow=(), timeout=5.0):
        self.boundary, self.drill_id, self.output_dir = boundary, drill_id, output_dir
        self.python, self.ttl, self.lifetime, self.timeout = python, ttl, leaf_lifetime, timeout
        self.telemetry = telemetry
        self.plan = _runtime.full_plan(boundary, drill_id)
        self.prefix = self.plan["prefix"]
        self.rules = _mtls.normalise_rules(boundary.tier_rules)
        self.server_rules = list(boundary.tier_rules) + list(inject_allow or ())  # normalised by server_config
        self.tiers = list(self.plan["tiers"])
        self.root = root_dir(drill_id)
        self.store = _pki.Store(drill_id, os.path.join(self.root, "pki"))
        self.rdir = os.path.join(output_dir, "runtime")
        self.servers = {}  # tier -> {"pid", "events", "ports"}
        self.rows, self.notes = [], []
        self.uid, self.gid = _uid()

    # ------------------------------------------------------------ layout
    def dests(self) -> dict:
        """``{tier: [port, ...]}``: every destination of a TCP tier rule and the ports it declares (range ends)."""
        return _mtls.rule_destinations(self.rules)

    def make_root(self):
        """The drill's mTLS directory on the tmpfs: ours (never a symlink or another user's), 0711 so the
        workloads can reach their own 0700 directories inside."""
        try:
            _secrets.require_tmpfs(self.root)
        except _secrets.SecretError as exc:
            raise MtlsDrillError("the drill's mTLS directory must be on a tmpfs: %s" % exc) from None
        try:
            os.mkdir(self.root, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(self.root)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise MtlsDrillError("%s exists and is not a directory of this user; remove it and run the drill again."
                                 % self.root)
        os.chmod(self.root, 0o711, follow_symlinks=False)  # noqa: S103 - traversal only; every entry inside is 0700

    def tier_dir(self, tier):
        return os.path.join(self.root, "tier-" + tier)

    def identity(self, tier):
        return os.path.join(self.tier_dir(tier), "identity.pem")

    def deliver(self, parts=("trust", "identity")):
        for tier in self.tiers:
            self.store.deliver(tier, self.tier_dir(tier), uid=self.uid, gid=self.gid, parts=parts)

    def odd(self, name, pem: bytes) -> str:
        """A probe identity the store never issued, where the tiers' workloads can read it (0600)."""
        directory = os.path.join(self.root, "probe")
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
            if self.uid is not None:
                os.chown(directory, self.uid, self.gid)
        path = os.path.join(directory, name)
        _pki.write_private(path, pem, uid=self.uid, gid=self.gid)
        return path

    # ------------------------------------------------------------ servers
    def _state(self):
        state = _runtime.read_state_file(self.output_dir)
        if not state or state.get("prefix") != self.prefix or state.get("state") != "present":
            raise MtlsDrillError("the runtime of drill %s is not present under %s; start it first (sandbox_runtime)."
                                 % (self.drill_id, self.output_dir))
        return state

    def _listeners(self, ns, without=()):
        return [{k: x[k] for k in ("kind", "name", "address", "protocol", "port")}
                for x in self.plan["world"]["listeners"]
                if x["ns"] == ns and (x["protocol"], x["port"]) not in without]

    def _restart_listener(self, state, tier, without):
        ns = self.plan["tiers"][tier]["ns"]
        key = "listeners:%s" % ns
        processes = state.setdefault("processes", {})
        old = processes.get(key) or {}
        if _runtime._alive(_netns, ns, old.get("pid")):  # noqa: SLF001
            _kill(old["pid"])
        processes.pop(key, None)
        spec = self._listeners(ns, without)
        if spec:
            pid = _netns.spawn(ns, [self.python, "-I", "-S", "-c", _runtime.LISTENER_SOURCE, json.dumps(spec)],
                               stderr_path=os.path.join(self.rdir, "%s.log" % tier))
            processes[key] = {"ns": ns, "pid": pid, "role": "listeners"}
        return {("tcp" if x["protocol"] == "tcp" else "udp", x["address"], x["port"]) for x in spec}

    def _bound(self, ns, wanted, what):
        def ready():
            return not (wanted - _runtime._sockets(_netns, ns, self.python))  # noqa: SLF001
        if not _wait(ready, READY, 0.05):
            raise MtlsDrillError("%s in %s did not bind its ports within %gs; see %s." % (what, ns, READY, self.rdir))

    def start_servers(self):
        state = self._state()
        try:
            for tier, ports in sorted(self.dests().items()):
                spec = self.plan["tiers"][tier]
                wanted = self._restart_listener(state, tier, {("tcp", p) for p in ports})
                config = _mtls.server_config(drill_id=self.drill_id, tier=tier, address=spec["address"], ports=ports,
                                             tier_rules=self.server_rules, identity=self.identity(tier),
                                             trust=os.path.join(self.tier_dir(tier), _pki.TRUST_FILE))
                events = os.path.join(self.rdir, "mtls-%s.jsonl" % tier)
                pid = _mtls.start_server(spec["ns"], config, events_path=events, python=self.python,
                                         stderr_path=os.path.join(self.rdir, "mtls-%s.log" % tier))
                state["processes"][SERVER_KEY + tier] = {"ns": spec["ns"], "pid": pid, "role": "mtls",
                                                         "ports": ports}
                self.servers[tier] = {"pid": pid, "events": events, "ports": ports}
                _runtime._write_state(self.output_dir, state)  # noqa: SLF001
                self._bound(spec["ns"], wanted | {("tcp", spec["address"], p) for p in ports},
                            "the mTLS server of tier %s" % tier)
        finally:
            _runtime._write_state(self.output_dir, state)  # noqa: SLF001 - teardown finds every process

    def stop_servers(self):
        """Stop the mTLS servers and give the tiers' plain listeners their ports back, as the runtime built them."""
        state = self._state()
        try:
            for tier in sorted(self.dests()):
                entry = state["processes"].pop(SERVER_KEY + tier, None)
                if entry and _runtime._alive(_netns, entry["ns"], entry.get("pid")):  # noqa: SLF001
                    _kill(entry["pid"])
                ns = self.plan["tiers"][tier]["ns"]
                wanted = self._restart_listener(state, tier, ())
                _runtime._write_state(self.output_dir, state)  # noqa: SLF001
                self._bound(ns, wanted, "the plain listener of tier %s" % tier)
        finally:
            _runtime._write_state(self.output_dir, state)  # noqa: SLF001

    def events(self, tier, type_=_mtls.HANDSHAKE_TYPE):
        return _mtls.read_events(self.servers[tier]["events"], type_)

    def reload(self):
        """SIGHUP every server and wait for its reload event; returns ``{tier: new serial}``."""
        before = {t: len(self.events(t, _mtls.RELOAD_TYPE)) for t in self.servers}
        for entry in self.servers.values():
            os.kill(entry["pid"], signal.SIGHUP)
        out = {}
        for tier in self.servers:
            got = _wait(lambda t=tier: self.events(t, _mtls.RELOAD_TYPE)[before[t]:], 10.0)
            if not got or got[-1]["data"].get("ok") is not True:
                raise MtlsDrillError("the mTLS server of tier %s did not reload its identity; see %s."
                                     % (tier, self.servers[tier]["events"]))
            out[tier] = got[-1]["data"]["serial"]
        return out

    # ------------------------------------------------------------ probes
    def client(self, src, dst, port, identity, **kwargs):
        return _mtls.client_config(drill_id=self.drill_id, address=self.plan["tiers"][dst]["address"], port=port,
                                   expect_tier=dst, identity=identity,
                                   trust=os.path.join(self.tier_dir(src), _pki.TRUST_FILE), timeout=self.timeout,
                                   **kwargs)

    def probe(self, case, src, dst, port, identity, expected, expected_reason):  # noqa: PLR0917
        """One handshake probe from ``src`` to ``dst``: a row of layer mtls, judged by the server's own event."""
        before = len(self.events(dst))
        try:
            got = _mtls.probe(self.plan["tiers"][src]["ns"], self.client(src, dst, port, identity),
                              python=self.python)[0]
        except _mtls.MtlsError as exc:
            got = {"ok": False, "reason": "probe_failed: %s" % exc.msg}
        new = _wait(lambda: self.events(dst)[before:], EVENT_WAIT)
        event = new[-1]["data"] if new else {}
        observed = "allow" if got.get("ok") else "deny"
        reason = "round_trip" if got.get("ok") else (event.get("reason") or got.get("reason"))
        row = {"src": src, "dst": dst, "address": "%s:%d" % (self.plan["tiers"][dst]["address"], port),
               "layer": "mtls", "case": case, "expected": expected, "observed": observed, "reason": reason,
               "expected_reason": expected_reason,
               "latency_ms": got.get("handshake_ms", event.get("latency_ms")),
               "peer_id": event.get("peer_id"), "serial": event.get("serial"),
               "server_serial": got.get("server_serial")}
        self.rows.append(row)
        return row

    def _odd_leaf(self, uri, *, ca_flag=False, eku=None, expired=False):
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415
        from cryptography.x509.oid import NameOID  # noqa: PLC0415
        now = datetime.datetime.now(datetime.timezone.utc)
        ca = self.store.issuing_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        eku = eku or [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        # A cA-true "leaf" as an attacker would make it (a subject, a key identifier): OpenSSL's strict checks
        # let it through and only the server's own reading of BasicConstraints refuses it.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tier-ca")]) if ca_flag else x509.Name([])
        start = now - datetime.timedelta(minutes=30 if expired else 1)
        end = now - datetime.timedelta(minutes=1) if expired else now + datetime.timedelta(minutes=15)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                                  critical=False))
        if ca_flag:
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                            critical=False)
        return _pki.cert_pem(builder.sign(ca.key, hashes.SHA256())) + _pki.key_pem(key)

    def allowed_pairs(self):
        out = []
        for rule in self.rules:
            for start, end in rule["ports"]:
                for port in dict.fromkeys((start, end)):
                    if (rule["from"], rule["to"], port) not in out:
                        out.append((rule["from"], rule["to"], port))
        return out

    def refusals(self, src, dst, port):
        from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415
        mine = _pki.spiffe_id(self.drill_id, src)
        other_id = "dr-other-%s" % self.drill_id[-8:].lower().replace("_", "-")
        other_ca = _pki.new_ca(other_id, 3600)
        other = _pki.issue_leaf(other_ca, other_id, src)
        self.probe("no_client_certificate", src, dst, port, None, "deny", "no_client_certificate")
        self.probe("another_drill_ca", src, dst, port,
                   self.odd("other-ca.pem", _pki.cert_pem(other.cert) + _pki.key_pem(other.key)),
                   "deny", "unknown_ca")
        self.probe("expired", src, dst, port, self.odd("expired.pem", self._odd_leaf(mine, expired=True)),
                   "deny", "expired")
        allowed = {(r["from"]) for r in self.rules if r["to"] == dst
                   and any(a <= port <= b for a, b in r["ports"])}
        stranger = next((t for t in sorted(self.tiers, key=lambda t: t != _pki.VALIDATION_TIER)
                         if t not in allowed), None)
        if stranger is not None:
            self.probe("identity_not_allowed:%s" % stranger, src, dst, port, self.identity(stranger), "deny",
                       "identity_not_allowed")
        self.probe("outside_trust_domain", src, dst, port,
                   self.odd("outside.pem", self._odd_leaf(_pki.spiffe_id(other_id, src))),
                   "deny", "name_constraint_violation")
        self.probe("wrong_eku", src, dst, port,
                   self.odd("eku.pem", self._odd_leaf(mine, eku=[ExtendedKeyUsageOID.SERVER_AUTH])),
                   "deny", "wrong_purpose")
        self.probe("ca_true", src, dst, port, self.odd("ca-true.pem", self._odd_leaf(mine, ca_flag=True)),
                   "deny", "ca_certificate")

    # ------------------------------------------------------------ rotation
    def leaf_rotation(self, src, dst, port):
        """A forced leaf rotation while ``src`` holds a connection to ``dst`` open and keeps handshaking."""
        with open(self.store.tier_file(src), "rb") as handle:
            old_leaf = self.odd("rotated-out.pem", handle.read())
        old_serial = self.store.state()["leaves"][dst]["serial"]
        soak_path = os.path.join(self.root, "soak.json")
        before = len(self.events(dst))
        config = self.client(src, dst, port, self.identity(src), mode="soak", duration=SOAK_SECONDS,
                             interval=0.02)
        pid = _netns.spawn(self.plan["tiers"][src]["ns"], _mtls.client_argv(config, self.python), env={},
                           stdout_path=soak_path)
        _wait(lambda: len(self.events(dst)) > before + 1, 10.0)  # the held connection and a first new one
        self.store.rotate(self.tiers, self.ttl, self.lifetime)
        self.deliver()
        new_serials = self.reload()
        self.store.retire()
        self.deliver(parts=("trust",))
        self.reload()
        finished = _wait(lambda: _exited(pid), SOAK_SECONDS + 30, 0.05)
        if not finished:
            _kill(pid)
        try:
            with open(soak_path, encoding="utf-8") as handle:
                soak = json.loads(handle.read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            soak = {"held": {"failures": ["no_result"], "round_trips": 0, "serial": None},
                    "new": {"failures": ["no_result"], "handshakes": 0, "serials": []}}
        during = self.events(dst)[before:]
        out = {"rotated": new_serials.get(dst) != old_serial, "pair": "%s->%s:%d" % (src, dst, port),
               "dropped_connections": 1 if soak["held"]["failures"] else 0,
               "held_round_trips": soak["held"]["round_trips"], "held_serial": soak["held"].get("serial"),
               "new_handshakes": soak["new"]["handshakes"], "new_serials": soak["new"]["serials"],
               "failed_handshakes": len(soak["new"]["failures"]) + sum(1 for e in during if not e["data"]["accepted"]),
               "old_serial": old_serial, "new_serial": new_serials.get(dst)}
        self.probe("rotated_out_leaf", src, dst, port, old_leaf, "deny", "revoked")
        return out

    def ca_rotation(self, src, dst, port):
        """Overlap bundle, new leaves from the new CA, then the new CA only: the old CA's leaf is refused."""
        with open(self.store.tier_file(src), "rb") as handle:
            old_leaf = self.odd("old-ca.pem", handle.read())
        old_ca = self.store.state()["cas"][-1]
        self.store.rotate(self.tiers, self.ttl, self.lifetime, ca=True)
        self.deliver(parts=("trust",))
        self.reload()
        self.deliver(parts=("identity",))
        self.reload()
        self.probe("old_ca_leaf_during_overlap", src, dst, port, old_leaf, "allow", "round_trip")
        self.store.retire()
        self.deliver(parts=("trust",))
        self.reload()
        new_ca = self.store.state()["cas"][-1]
        row = self.probe("after_ca_rotation", src, dst, port, self.identity(src), "allow", "round_trip")
        self.probe("old_ca_leaf_after_retirement", src, dst, port, old_leaf, "deny", "unknown_ca")
        return {"rotated": new_ca != old_ca, "old_ca": old_ca, "new_ca": new_ca,
                "old_ca_key_destroyed": not os.path.lexists(os.path.join(self.store.dir, "ca-%s.key" % old_ca)),
                "new_server_serial": row["server_serial"]}

    # ------------------------------------------------------------ all
    def send_events(self):
        if not self.telemetry:
            return None
        events = []
        for tier in sorted(self.servers):
            events += _mtls.read_events(self.servers[tier]["events"], _mtls.HANDSHAKE_TYPE)
            events += _mtls.read_events(self.servers[tier]["events"], _mtls.RELOAD_TYPE)
        cp = self.plan["world"]["neighbours"].get("control_plane")
        ns = cp["ns"] if cp else self.plan["tiers"][_pki.VALIDATION_TIER]["ns"]
        try:
            return _telemetry.deliver(ns, events, self.telemetry["address"], int(self.telemetry["port"]),
                                      drill_id=self.drill_id, python=self.python)
        except _telemetry.TelemetryError as exc:
            return {"error": exc.msg, "sent": exc.detail.get("sent"), "acknowledged": exc.detail.get("acknowledged")}

    def run(self) -> dict:
        started = time.monotonic()
        dests = self.dests()
        if not dests:
            return {"changed": False, "skipped": True, "rows": [], "violations": [], "unexpected": [],
                    "handshakes": [], "note": "drill_boundary declares no tcp tier rule: no tier-to-tier call to "
                                              "secure, no mTLS server started"}
        self.make_root()
        actions = self.store.present([t for t in self.tiers if t != _pki.VALIDATION_TIER], self.ttl, self.lifetime)
        self.deliver()
        result = {"changed": True, "skipped": False, "pki_actions": actions}
        try:
            self.start_servers()
            pairs = self.allowed_pairs()
            for src, dst, port in pairs:
                self.probe("allowed", src, dst, port, self.identity(src), "allow", "round_trip")
            first = pairs[0]
            self.refusals(*first)
            result["rotation"] = self.leaf_rotation(*first)
            result["ca_rotation"] = self.ca_rotation(*first)
            result["telemetry"] = self.send_events()
            result["handshakes"] = [dict(e["data"], time=e["time"]) for t in sorted(self.servers)
                                    for e in self.events(t)]
            result["reloads"] = sum(len(self.events(t, _mtls.RELOAD_TYPE)) for t in self.servers)
        finally:
            if self.servers:
                self.stop_servers()
        summary = self.store.summary()
        result.update(
            trust_domain=summary["trust_domain"],
            ca={k: summary["ca"][k] for k in ("serial", "sha256", "not_before", "not_after")},
            leaves={t: dict(leaf) for t, leaf in summary["leaves"].items()},
            servers=[{"tier": t, "address": self.plan["tiers"][t]["address"], "ports": p}
                     for t, p in sorted(dests.items())],
            rows=self.rows,
            violations=[r for r in self.rows if r["observed"] != r["expected"]],
            unexpected=[r for r in self.rows if r["observed"] == r["expected"]
                        and r["reason"] != r["expected_reason"]],
            seconds=round(time.monotonic() - started, 3))
        return result


def _exited(pid):
    _netns._reap()  # noqa: SLF001
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
