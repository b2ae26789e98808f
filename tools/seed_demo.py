#!/usr/bin/env python3
"""Seed the demo world in the embedded emulator: a small "production" to be isolated from.

Creates, in the emulator only (refuses to run without DRGUARD_EMULATOR_URL):

* a production VPC (10.0.0.0/16 plus 10.1.0.0/16) with subnets, an internet gateway,
  a security group and an instance — what the drill must never reach;
* a backup bucket (versioned, Object Lock COMPLIANCE default retention) holding a
  backup set ``orders-db``: a SQLite database and a tar archive;
* a quarantine bucket (Object Lock enabled) outside the sandbox;
* a fresh Ed25519 signing key (kept only until the manifest is signed; never committed),
  the trust policy with its public key, and the variable files for signing and for the
  drill.

``--mode tampered`` signs the genuine files but stores a copy of ``files.tar`` with one
flipped byte, as storage corruption or tampering would: the drill must halt.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import sqlite3
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import boto3
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PRODUCTION_CIDRS = ["10.0.0.0/16", "10.1.0.0/16"]
CONTROL_PLANE = "192.0.2.0/28"
TELEMETRY = "198.51.100.0/28"
DR_SITE = "203.0.113.0/28"  # the fallback path (TEST-NET-3): only ever a namespace of the embedded world
BACKUP_SET = "orders-db"


def make_sqlite(path: Path, rows: int = 500) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, "
                "amount_cents INTEGER NOT NULL, created_at TEXT NOT NULL)")
    con.executemany("INSERT INTO orders (customer, amount_cents, created_at) VALUES (?, ?, ?)",
                    [("customer-%04d" % (i % 97), 100 + i * 7, "2026-11-28T00:%02d:00Z" % (i % 60))
                     for i in range(rows)])
    con.commit()
    con.close()


def make_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, body in (("config/app.yml", b"listen: 8443\nmtls: required\n"),
                           ("uploads/invoice-0001.txt", b"invoice 0001\n" * 200)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = 1764288000
            tar.addfile(info, io.BytesIO(body))


def seed_production(ec2) -> dict:
    vpc = ec2.create_vpc(CidrBlock=PRODUCTION_CIDRS[0])["Vpc"]["VpcId"]
    ec2.associate_vpc_cidr_block(VpcId=vpc, CidrBlock=PRODUCTION_CIDRS[1])
    ec2.create_tags(Resources=[vpc], Tags=[{"Key": "Name", "Value": "production"},
                                           {"Key": "env", "Value": "production"}])
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=c)["Subnet"]["SubnetId"]
               for c in ("10.0.1.0/24", "10.1.1.0/24")]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    rtb = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=rtb, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    sg = ec2.create_security_group(GroupName="production-db", Description="production database",
                                   VpcId=vpc)["GroupId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                 SubnetId=subnets[0], SecurityGroupIds=[sg])["Instances"][0]["InstanceId"]
    return {"vpc_id": vpc, "subnets": subnets, "igw": igw, "instance": instance}


def seed_buckets(s3, suffix: str) -> tuple[str, str]:
    backups = "drguard-demo-backups-%s" % suffix
    quarantine = "drguard-demo-quarantine-%s" % suffix
    for name in (backups, quarantine):
        s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    s3.put_object_lock_configuration(Bucket=backups, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}}})
    return backups, quarantine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="demo directory (recreated)")
    parser.add_argument("--mode", choices=["passing", "tampered"], default="passing")
    parser.add_argument("--drill-id", required=True)
    args = parser.parse_args()
    if not os.environ.get("DRGUARD_EMULATOR_URL"):
        print("seed_demo.py seeds the embedded emulator only; run it through tools/emulator.py run",
              file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    region = os.environ.get("AWS_REGION", "us-east-1")
    ec2, s3 = boto3.client("ec2", region_name=region), boto3.client("s3", region_name=region)

    production = seed_production(ec2)
    suffix = secrets.token_hex(4)
    backups, quarantine = seed_buckets(s3, suffix)

    staging = out / "staging"
    staging.mkdir(exist_ok=True)
    make_sqlite(staging / "orders.sqlite")
    make_tar(staging / "files.tar")
    prefix = "%s/42/" % BACKUP_SET
    for name in ("orders.sqlite", "files.tar"):
        body = (staging / name).read_bytes()
        if args.mode == "tampered" and name == "files.tar":
            body = body[:100] + bytes([body[100] ^ 0x01]) + body[101:]
        s3.put_object(Bucket=backups, Key=prefix + name, Body=body, ChecksumAlgorithm="SHA256")

    # The signing key lives only in a private temp dir until sign_backup.yml has run.
    keydir = Path(tempfile.mkdtemp(prefix="drguard-demo-key-"))
    key = Ed25519PrivateKey.generate()
    key_path = keydir / "signing-key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    trust_policy = out / "trust-policy.json"
    trust_policy.write_text(json.dumps({"threshold": 1, "keys": [{"public_key": public_pem}]}, indent=2))

    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest_uri = "s3://%s/manifests/%s-42.dsse.json" % (backups, BACKUP_SET)
    sign_vars = {
        "sign_backup_set": BACKUP_SET,
        "sign_sequence": 42,
        "sign_tier": "tier-1",
        "sign_created_at": now,
        "sign_ttl": 7 * 24 * 3600,
        # passing: hash what is stored (pins S3 version ids); tampered: hash the genuine
        # local files, while storage holds a corrupted copy.
        "sign_source": "s3://%s/%s" % (backups, prefix) if args.mode == "passing" else str(staging),
        "sign_dest": manifest_uri,
        "sign_private_key_path": str(key_path),
        "sign_region": region,
    }
    (out / "sign-vars.yml").write_text(yaml.safe_dump(sign_vars, sort_keys=False))

    drill_vars = {
        "drill_id": args.drill_id,
        "drill_region": region,
        "drill_output_root": str(out.parent),
        "drill_boundary": {
            "production_cidrs": PRODUCTION_CIDRS,
            "ingress": [{"cidr": CONTROL_PLANE, "protocol": "tcp", "ports": [22, 443],
                         "description": "control plane"}],
            "egress": [{"cidr": CONTROL_PLANE, "protocol": "tcp", "ports": [443], "description": "control plane"},
                       {"cidr": TELEMETRY, "protocol": "tcp", "ports": [443, 4317], "kind": "telemetry",
                        "description": "telemetry"}],
            "fallback": [{"cidr": DR_SITE, "protocol": "tcp", "ports": [443], "description": "DR site"}],
            "tiers": ["app", "db"],
            "tier_rules": [{"from": "app", "to": "db", "protocol": "tcp", "ports": [5432]}],
            "s3_read": [{"bucket": backups, "prefix": prefix}],
        },
        "drill_backup": {
            "manifest": manifest_uri,
            "source": "s3://%s/%s" % (backups, prefix),
            "trust_policy": str(trust_policy),
            "trusted_state": str(out / "trusted-state.json"),
            "max_age": 86400,
            "require_object_lock": "compliance",
        },
        "drill_quarantine": "s3://%s/quarantine/" % quarantine,
        # The sandbox gets synthetic credentials and a masked copy of a production token.
        "drill_secrets": [
            {"name": "orders-db", "kind": "synthetic_db"},
            {"name": "api-token", "kind": "masked", "value": "ghp_" + secrets.token_hex(18)},
        ],
        "drill_masking_key": secrets.token_urlsafe(32),
        "drill_validation": {
            # python3 from PATH: the controller's on the controller, the system's inside a tier (a workload
            # cannot read a virtualenv under the controller's home).
            "argv": ["python3", str(Path(__file__).resolve().parent.parent / "playbooks" / "files"
                                    / "check_orders.py")],
            "env_secrets": {"ORDERS_DB_CREDENTIALS": "orders-db"},
            "file_secrets": {"api-token": "api-token"},
        },
        "drill_targets": {"rto_seconds": 900, "rpo_seconds": 86400},
    }
    (out / "drill-vars.yml").write_text(yaml.safe_dump(drill_vars, sort_keys=False))
    (out / "world.json").write_text(json.dumps({"production": production, "backup_bucket": backups,
                                                "quarantine_bucket": quarantine, "key_dir": str(keydir)},
                                               indent=2))
    print(json.dumps({"backup_bucket": backups, "quarantine_bucket": quarantine,
                      "production_vpc": production["vpc_id"], "key_dir": str(keydir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
