#!/usr/bin/env python
"""Demo validation command, run by secret_exec after the restore.

It plays the application: logs in with the drill's synthetic database credentials
(environment) and API token (a 0600 file on tmpfs), then checks that the restored orders
database answers queries. With the netns runtime it runs in the app tier and asks the db
tier's service at DRGUARD_DB_ADDRESS (host:port) through the declared tier rule, over mutual
TLS 1.3: it presents its tier's leaf (DRGUARD_TLS_CERT / DRGUARD_TLS_KEY, files of its private
tmpfs), trusts only the drill's CA bundle (DRGUARD_TLS_CA) and accepts only a server whose one
URI SAN is DRGUARD_TLS_SERVER_ID (the db tier's SPIFFE id). Without a runtime (backend none) it
opens the restored file in its working directory read-only. It never prints a secret.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import ssl
import sys

QUERY = "SELECT count(*), sum(amount_cents) FROM orders"


def tls_context():
    """Mutual TLS 1.3 with the tier's leaf and the drill's CA bundle only (its CRLs checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the server's identity is its SPIFFE URI, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.load_verify_locations(cafile=os.environ["DRGUARD_TLS_CA"])
    ctx.load_cert_chain(os.environ["DRGUARD_TLS_CERT"], os.environ["DRGUARD_TLS_KEY"])
    return ctx


def ask_db_service(address: str):
    """``(rows, total)`` from the db tier's service (one SELECT per line, one JSON answer per line)."""
    host, _sep, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with tls_context().wrap_socket(raw) as conn:
            sans = [value for kind, value in conn.getpeercert().get("subjectAltName", ()) if kind == "URI"]
            if sans != [os.environ["DRGUARD_TLS_SERVER_ID"]]:
                raise RuntimeError("the db service presented %s, not %s" % (sans, os.environ["DRGUARD_TLS_SERVER_ID"]))
            conn.sendall(QUERY.encode() + b"\n")
            answer = json.loads(conn.makefile("rb").readline() or b"{}")
    if not answer.get("ok"):
        raise RuntimeError("the db service refused the query: %s" % answer.get("error", "no answer"))
    return tuple(answer["rows"][0])


def read_local_file():
    con = sqlite3.connect("file:orders.sqlite?mode=ro", uri=True)
    try:
        return con.execute(QUERY).fetchone()
    finally:
        con.close()


def main() -> int:
    db = json.loads(os.environ["ORDERS_DB_CREDENTIALS"])
    if not db.get("username") or len(db.get("password", "")) < 16:
        print("synthetic database credentials are missing or weak")
        return 1
    token_path = os.path.join(os.environ["DRGUARD_SECRETS_DIR"], "api-token")
    if oct(os.stat(token_path).st_mode & 0o777) != "0o600":
        print("token file is not 0600")
        return 1
    with open(token_path) as handle:
        token = handle.read().strip()
    if not token.startswith("ghp_") or len(token) != 40:
        print("masked API token does not keep the production token's shape")
        return 1
    address = os.environ.get("DRGUARD_DB_ADDRESS")
    try:
        rows, total = ask_db_service(address) if address else read_local_file()
    except (OSError, RuntimeError, ValueError, KeyError, sqlite3.Error) as exc:
        where = "the db service at %s" % address if address else "orders.sqlite"
        print("cannot query %s: %s" % (where, exc))
        return 1
    if not rows:
        print("orders table is empty")
        return 1
    via = "db tier %s over mTLS" % address if address else "local file"
    print("orders: %d rows, %d cents (%s); login as synthetic user ok; token shape ok" % (rows, total, via))
    return 0


if __name__ == "__main__":
    sys.exit(main())
