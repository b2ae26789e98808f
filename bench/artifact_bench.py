#!/usr/bin/env python3
"""Benchmark: the artifact gate (verify_artifacts) - throughput, memory, scale, workers.

Figures, not assertions: prints a table and writes bench/results/artifacts-<time>.json.
Every verification runs the real module (drguard.sandbox.verify_artifacts) in a child process,
the way Ansible runs it: ansible-core's AnsiballZ loader (``run_module``: arguments handed
to ``basic``, the module run as ``__main__``), so Python start-up, imports, argument
validation and the JSON result are included and the child's peak RSS can be read.
``--runner testing`` uses ansible-core's unit-test hook instead (it also imports
``unittest.mock`` and ``asyncio``, about 40 ms a module never pays in a play).

Measured in one run:

1. one big local file (``--big-gib``, default 2 GiB) in ``full`` mode, against
   ``openssl dgst -sha256`` on the same file (MiB/s each, and the ratio for the whole module
   process), and the verifying process's peak RSS;
2. two local files of ``--pair-gib`` GiB each (default 1; 0 skips) verified with ``workers``
   1 and 2 (whole-process seconds and the speed-up);
3. ``--counts`` (default 1000,10000) small artifacts in a versioned COMPLIANCE Object Lock
   bucket on the emulator, verified in ``metadata`` and ``full`` mode (seconds, growth ratio);
4. ``workers`` 1 / 2 / 8 (``--workers``) on the smallest set, ``full`` mode.

Usage: .venv/bin/python bench/artifact_bench.py [--big-gib 2] [--pair-gib 1] [--counts 1000,10000] [--workers 1,2,8]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / ".collections"
sys.path[:0] = [str(COLLECTIONS), str(ROOT / "tools"), str(ROOT / "tests")]

import boto3  # noqa: E402
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf  # noqa: E402
from botocore.config import Config  # noqa: E402
from emulator import child_env, Emulator  # noqa: E402
from helpers_artifacts import create_locked_bucket  # noqa: E402
from helpers_artifacts import generate_key  # noqa: E402
from helpers_artifacts import make_statement  # noqa: E402
from helpers_artifacts import sign_statement  # noqa: E402
from helpers_artifacts import write_trust_policy  # noqa: E402

MIB = 1024 * 1024
BLOCK = 64 * MIB

# The child: the module with the arguments in argv[1], run by AnsiballZ's own loader (what
# the AnsiballZ wrapper calls after unpacking, in every play) ...
RUNNERS = {"ansiballz": r"""
import sys
sys.path.insert(0, sys.argv[2])
from ansible.module_utils._internal._ansiballz._loader import run_module
with open(sys.argv[1], "rb") as handle:
    params = b'{"ANSIBLE_MODULE_ARGS": ' + handle.read() + b'}'
run_module(json_params=params, profile="legacy", module_fqn="ansible_collections.drguard.sandbox.plugins.modules."
           "verify_artifacts", modlib_path=sys.argv[2], extensions={})
""",
           # ... or main() under ansible-core's unit-test hook (the runner of earlier figures).
           "testing": r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from ansible.module_utils.testing import patch_module_args
from ansible_collections.drguard.sandbox.plugins.modules import verify_artifacts
with open(sys.argv[1]) as handle:
    args = json.load(handle)
with patch_module_args(args):
    verify_artifacts.main()
"""}
RUNNER = RUNNERS["ansiballz"]


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_child(cmd: list, stdout_path: str, env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, exit code, the command's own peak RSS (MiB) and its stdout.

    The peak RSS comes from GNU time (``%M``) when it is installed: a child forked straight
    from this (large) process would inherit this process's RSS high-water mark at exec, so
    ``ru_maxrss`` of a direct child overstates; GNU time is small and forks the command
    itself. Without GNU time, ``os.wait4``'s ``ru_maxrss`` is reported (an upper bound).
    """
    rss_file = stdout_path + ".rss"
    full = [TIME, "-f", "%M", "-o", rss_file] + cmd if TIME else cmd
    out = open(stdout_path, "wb")  # noqa: SIM115 - closed below
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        out.close()
    rss_kib, how = usage.ru_maxrss, "wait4 (upper bound)"
    if TIME:
        try:
            rss_kib, how = int(Path(rss_file).read_text().split()[-1]), "GNU time %M"
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rss_file)
    text = Path(stdout_path).read_text()
    os.unlink(stdout_path)
    return {"seconds": wall, "rc": proc.returncode, "max_rss_mib": rss_kib / 1024.0, "rss_source": how,
            "user_seconds": usage.ru_utime, "sys_seconds": usage.ru_stime, "stdout": text}


def run_module(args: dict, workdir: str, env: dict | None = None) -> dict:
    """verify_artifacts in a child process; returns timing, RSS and the module's JSON result."""
    args_path = os.path.join(workdir, "args-%d.json" % time.monotonic_ns())
    with open(args_path, "w") as handle:
        json.dump(args, handle)
    out_path = args_path + ".out"
    child = run_child([sys.executable, "-c", RUNNER, args_path, str(COLLECTIONS)], out_path, env=env)
    lines = child.pop("stdout").strip().splitlines()
    try:
        child["result"] = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        child["result"] = {"failed": True, "msg": "no JSON result: %r" % lines[-3:]}
    return child


def check_verified(label: str, run: dict) -> None:
    """A benchmark of a failing verification would be meaningless: stop with its message."""
    res = run["result"]
    if run["rc"] != 0 or res.get("verified") is not True:
        reasons = sorted({f.get("reason") for f in res.get("failures", [])})
        raise SystemExit("%s: verification did not succeed (rc %s, %s, reasons %s)" % (
            label, run["rc"], res.get("msg"), reasons))


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


def make_big_file(path: str, size: int) -> None:
    """``size`` bytes quickly: 64 MiB of urandom, each block varied by a counter prefix."""
    block = bytearray(os.urandom(min(BLOCK, size)))
    with open(path, "wb") as handle:
        written, n = 0, 0
        while written < size:
            block[:8] = n.to_bytes(8, "big")
            piece = block[:min(len(block), size - written)]
            handle.write(piece)
            written += len(piece)
            n += 1
        handle.flush()
        os.fsync(handle.fileno())


def openssl_sha256(path: str) -> tuple:
    child = run_child(["openssl", "dgst", "-sha256", "-r", path], path + ".openssl.out")
    digest = child.pop("stdout").split()[0]
    if child["rc"] != 0 or len(digest) != 64:
        raise SystemExit("openssl dgst failed (rc %s)" % child["rc"])
    return digest, child


# ----------------------------------------------------------------------------- 1. big local file

def bench_big(tmp: str, gib: float, rounds: int, key, policy: str) -> dict:
    size = int(gib * 1024 * MIB)
    src = os.path.join(tmp, "big-set")
    os.makedirs(src)
    path = os.path.join(src, "big.bin")
    t0 = time.perf_counter()
    make_big_file(path, size)
    created = time.perf_counter() - t0
    print("created %.2f GiB in %.1f s" % (size / 1024 / MIB, created), flush=True)

    digest, _ = openssl_sha256(path)  # also warms the page cache for both readers
    manifest = os.path.join(tmp, "big.dsse.json")
    statement = make_statement("bench-big", 1, [mf.Artifact("big.bin", digest, size, "raw", None)])
    Path(manifest).write_bytes(sign_statement(statement, [key]))
    args = {"manifest": manifest, "source": src, "trust_policy": policy, "mode": "full"}

    runs = []
    for i in range(rounds):  # interleaved, so both see the same load and cache state
        _, ossl = openssl_sha256(path)
        mod = run_module(args, tmp)
        check_verified("big file", mod)
        art = mod["result"]["artifacts"][0]
        assert_equal(mod["result"]["bytes_hashed"], size, "bytes hashed")
        runs.append({"round": i + 1, "openssl_seconds": ossl["seconds"], "module_seconds": mod["seconds"],
                     "module_artifact_seconds": art["seconds"], "module_max_rss_mib": mod["max_rss_mib"],
                     "openssl_max_rss_mib": ossl["max_rss_mib"]})
        print("  round %d: openssl %.2f s, module %.2f s (artifact %.2f s), module peak RSS %.1f MiB" % (
            i + 1, ossl["seconds"], mod["seconds"], art["seconds"], mod["max_rss_mib"]), flush=True)
    best_ossl = min(r["openssl_seconds"] for r in runs)
    best_mod = min(r["module_seconds"] for r in runs)
    best_art = min(r["module_artifact_seconds"] for r in runs)
    os.unlink(path)
    return {
        "bytes": size, "create_seconds": round(created, 2), "rounds": runs,
        "openssl_mib_s": round(mib_s(size, best_ossl), 1),
        "module_mib_s": round(mib_s(size, best_mod), 1),
        "module_hash_only_mib_s": round(mib_s(size, best_art), 1),
        "ratio_module_to_openssl": round(best_ossl / best_mod, 3),
        "ratio_hash_only_to_openssl": round(best_ossl / best_art, 3),
        "peak_rss_mib": round(max(r["module_max_rss_mib"] for r in runs), 1),
    }


def bench_pair(tmp: str, gib: float, rounds: int, key, policy: str) -> dict:
    """Two local files of ``gib`` GiB each, verified with workers 1 and 2 (interleaved rounds, best kept)."""
    size = int(gib * 1024 * MIB)
    src = os.path.join(tmp, "pair-set")
    os.makedirs(src)
    arts = []
    for name in ("a.bin", "b.bin"):
        path = os.path.join(src, name)
        make_big_file(path, size)
        digest, _ = openssl_sha256(path)  # the digest, and the page cache warmed
        arts.append(mf.Artifact(name, digest, size, "raw", None))
    manifest = os.path.join(tmp, "pair.dsse.json")
    Path(manifest).write_bytes(sign_statement(make_statement("bench-pair", 1, arts), [key]))
    runs = {1: [], 2: []}
    for i in range(rounds):
        for workers in (1, 2):
            run = run_module({"manifest": manifest, "source": src, "trust_policy": policy, "mode": "full",
                              "workers": workers}, tmp)
            check_verified("pair, workers=%d" % workers, run)
            assert_equal(run["result"]["bytes_hashed"], 2 * size, "bytes hashed")
            secs = [a["seconds"] for a in run["result"]["artifacts"]]
            runs[workers].append({"round": i + 1, "module_seconds": run["seconds"], "artifact_seconds": secs,
                                  "user_seconds": run["user_seconds"]})
            print("  round %d workers=%d: module %.2f s (artifacts %s s)" % (
                i + 1, workers, run["seconds"], ", ".join("%.2f" % x for x in secs)), flush=True)
    for name in ("a.bin", "b.bin"):
        os.unlink(os.path.join(src, name))
    best = {w: min(r["module_seconds"] for r in runs[w]) for w in runs}
    return {"bytes_each": size, "rounds": {str(w): r for w, r in runs.items()},
            "workers_1_seconds": round(best[1], 3), "workers_2_seconds": round(best[2], 3),
            "speedup_2_vs_1": round(best[1] / best[2], 3)}


def bytecode_state() -> dict:
    """Whether the children compile the collection's sources on every run (as a play does: AnsiballZ
    imports the module and its module_utils from a zip, where no bytecode is cached) or reuse cached
    bytecode (``__pycache__`` under ``plugins/``, written unless PYTHONDONTWRITEBYTECODE is set):
    a few tens of milliseconds of start-up either way, so the figures say which."""
    cached = any(part == "__pycache__" for path in (ROOT / "plugins").rglob("*.pyc") for part in path.parts)
    return {"PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"), "plugins_pycache": cached}


def assert_equal(got, want, what: str) -> None:
    if got != want:
        raise SystemExit("%s: got %r, expected %r" % (what, got, want))


# ----------------------------------------------------------------------------- 2./3. emulator

def upload_set(s3, bucket: str, prefix: str, *, count: int, size: int, threads: int) -> list:
    """``count`` small objects (SHA-256 checksummed, parallel); returns manifest artifacts."""
    def put(i):
        name = "a/%05d.bin" % i
        body = os.urandom(size)
        resp = s3.put_object(Bucket=bucket, Key=prefix + name, Body=body, ChecksumAlgorithm="SHA256")
        return mf.Artifact(name, hashlib.sha256(body).hexdigest(), size, "raw", resp["VersionId"])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(put, range(count)))


def bench_emulator(tmp: str, counts: list, workers: list, *, obj_size: int, key, policy: str,
                   scale_workers: int | None, threads: int) -> dict:
    out = {"sets": {}, "workers": {}}
    with Emulator() as emu:
        env = child_env(emu.url)
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        session = boto3.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])
        config = Config(max_pool_connections=threads + 4, retries={"max_attempts": 10})
        s3 = session.client("s3", endpoint_url=emu.url, config=config)
        bucket = create_locked_bucket(s3, "drguard-bench-artifacts", mode="COMPLIANCE", days=1)
        sets = {}
        for count in counts:
            prefix = "set-%d/" % count
            t0 = time.perf_counter()
            arts = upload_set(s3, bucket, prefix, count=count, size=obj_size, threads=threads)
            upload = time.perf_counter() - t0
            statement = make_statement("bench-%d" % count, 1, arts)
            data = sign_statement(statement, [key])
            mkey = "manifests/bench-%d.dsse.json" % count
            s3.put_object(Bucket=bucket, Key=mkey, Body=data, ChecksumAlgorithm="SHA256")
            sets[count] = {"manifest": "s3://%s/%s" % (bucket, mkey), "source": "s3://%s/%s" % (bucket, prefix),
                           "trust_policy": policy}
            print("uploaded %d objects of %d bytes in %.1f s; manifest %d bytes" % (
                count, obj_size, upload, len(data)), flush=True)
            entry = {"upload_seconds": round(upload, 2), "manifest_bytes": len(data)}
            for mode in ("metadata", "full"):
                args = dict(sets[count], mode=mode)
                if scale_workers:
                    args["workers"] = scale_workers
                emu.calls(reset=True)
                run = run_module(args, tmp, env)
                check_verified("%d artifacts, %s" % (count, mode), run)
                calls = emu.calls()
                entry[mode] = {"seconds": round(run["seconds"], 2), "max_rss_mib": round(run["max_rss_mib"], 1),
                               "bytes_hashed": run["result"]["bytes_hashed"], "api_calls": calls.get("total"),
                               "artifacts_per_second": round(count / run["seconds"], 1)}
                print("  %6d artifacts %-8s %7.2f s  (%s API calls, peak RSS %.1f MiB)" % (
                    count, mode, run["seconds"], calls.get("total"), run["max_rss_mib"]), flush=True)
            out["sets"][str(count)] = entry
        if len(counts) > 1:
            small, large = str(counts[0]), str(counts[-1])
            out["growth"] = {mode: round(out["sets"][large][mode]["seconds"] / out["sets"][small][mode]["seconds"], 2)
                             for mode in ("metadata", "full")}
            out["growth"]["count_ratio"] = counts[-1] / counts[0]
        for w in workers:
            args = dict(sets[counts[0]], mode="full", workers=w)
            run = run_module(args, tmp, env)
            check_verified("workers=%d" % w, run)
            out["workers"][str(w)] = {"seconds": round(run["seconds"], 2)}
            print("  %6d artifacts full workers=%-2d %7.2f s" % (counts[0], w, run["seconds"]), flush=True)
        base = out["workers"][str(workers[0])]["seconds"]
        for w in workers:
            out["workers"][str(w)]["speedup_vs_%d" % workers[0]] = round(base / out["workers"][str(w)]["seconds"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-gib", type=float, default=2.0, help="size of the big local file in GiB (0 skips)")
    parser.add_argument("--rounds", type=int, default=2, help="openssl/module rounds on the big file (best is kept)")
    parser.add_argument("--pair-gib", type=float, default=1.0,
                        help="size of each of the two files verified with workers 1 and 2, in GiB (0 skips)")
    parser.add_argument("--runner", choices=sorted(RUNNERS), default="ansiballz",
                        help="how the child runs the module (default: AnsiballZ's loader, as in a play)")
    parser.add_argument("--counts", default="1000,10000", help="artifact counts for the emulator sets ('' skips)")
    parser.add_argument("--workers", default="1,2,8", help="workers compared on the smallest set")
    parser.add_argument("--scale-workers", type=int, default=None,
                        help="workers for the count sets (default: the module's default, the CPU count)")
    parser.add_argument("--object-size", type=int, default=1024, help="bytes per small artifact")
    parser.add_argument("--upload-threads", type=int, default=16)
    parser.add_argument("--tmp", default=None, help="directory for the big file (default: system temp dir)")
    args = parser.parse_args()
    global RUNNER  # noqa: PLW0603 - the child program chosen once for the run
    RUNNER = RUNNERS[args.runner]
    counts = sorted(int(c) for c in args.counts.split(",") if c.strip())
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    started = datetime.now(UTC)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = {"started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "command": " ".join([".venv/bin/python"] + sys.argv),
              "runner": args.runner,
              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "openssl": subprocess.run(["openssl", "version"], capture_output=True, text=True,
                                                 check=False).stdout.strip(),
                       "loadavg_before": [round(x, 2) for x in load_before]},
              "bytecode": bytecode_state()}
    key = generate_key("ed25519")
    with tempfile.TemporaryDirectory(prefix="drguard-artifact-bench-", dir=args.tmp) as tmp:
        policy = write_trust_policy(os.path.join(tmp, "trust.json"), [key])
        free = shutil.disk_usage(tmp).free
        if args.big_gib > 0:
            if free < args.big_gib * 1024 * MIB * 1.1:
                raise SystemExit("not enough free space in %s for %.1f GiB" % (tmp, args.big_gib))
            print("== big local file, full mode", flush=True)
            result["big_file"] = bench_big(tmp, args.big_gib, args.rounds, key, policy)
        if args.pair_gib > 0:
            if free < args.pair_gib * 2 * 1024 * MIB * 1.1:
                raise SystemExit("not enough free space in %s for 2 x %.1f GiB" % (tmp, args.pair_gib))
            print("== two local files, workers 1 and 2", flush=True)
            result["pair"] = bench_pair(tmp, args.pair_gib, args.rounds, key, policy)
        if counts:
            print("== emulator sets (COMPLIANCE Object Lock bucket)", flush=True)
            result["emulator"] = bench_emulator(tmp, counts, workers, obj_size=args.object_size, key=key, policy=policy,
                                                scale_workers=args.scale_workers, threads=args.upload_threads)
    result["host"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - t0, 1)

    print()
    print("== summary (load average before %s, after %s)" % (result["host"]["loadavg_before"],
                                                              result["host"]["loadavg_after"]))
    cached = result["bytecode"]["plugins_pycache"]
    print("collection bytecode: %s" % ("cached under plugins/ (a faster start-up than in a play)" if cached
                                       else "compiled on every run, as in a play"))
    big = result.get("big_file")
    if big:
        print("big file %.2f GiB: openssl %.0f MiB/s, module %.0f MiB/s (hash loop alone %.0f MiB/s)" % (
            big["bytes"] / 1024 / MIB, big["openssl_mib_s"], big["module_mib_s"], big["module_hash_only_mib_s"]))
        print("  ratio module/openssl %.3f (target >= 0.95); peak RSS %.1f MiB (target < 100 MiB)" % (
            big["ratio_module_to_openssl"], big["peak_rss_mib"]))
    pair = result.get("pair")
    if pair:
        print("two files of %.2f GiB: workers=1 %.2f s, workers=2 %.2f s, speed-up x%.3f (target >= 1.9)" % (
            pair["bytes_each"] / 1024 / MIB, pair["workers_1_seconds"], pair["workers_2_seconds"],
            pair["speedup_2_vs_1"]))
    emu = result.get("emulator")
    if emu:
        for count, entry in emu["sets"].items():
            print("%6s artifacts: metadata %.2f s, full %.2f s" % (count, entry["metadata"]["seconds"],
                                                                   entry["full"]["seconds"]))
        if "growth" in emu:
            print("growth %sx artifacts: metadata x%.2f, full x%.2f" % (
                int(emu["growth"]["count_ratio"]), emu["growth"]["metadata"], emu["growth"]["full"]))
        print("workers (full, %d artifacts): %s" % (counts[0], ", ".join(
            "%s: %.2f s (x%.2f)" % (w, v["seconds"], list(v.values())[1]) for w, v in emu["workers"].items())))
    print("total %.1f s" % result["total_seconds"])
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / ("artifacts-%s.json" % started.strftime("%Y%m%dT%H%M%SZ"))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote %s" % out.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
