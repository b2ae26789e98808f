#!/usr/bin/env python3
"""Demo validation command, run inside the sandbox by secret_exec after the restore.

It plays the application: logs in with the drill's synthetic database credentials
(environment) and API token (a 0600 file on tmpfs), opens the restored orders database
read-only and checks that it answers queries. It never prints a secret.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys


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
    con = sqlite3.connect("file:orders.sqlite?mode=ro", uri=True)
    rows, total = con.execute("SELECT count(*), sum(amount_cents) FROM orders").fetchone()
    con.close()
    if not rows:
        print("orders table is empty")
        return 1
    print("orders: %d rows, %d cents; login as synthetic user ok; token shape ok" % (rows, total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
