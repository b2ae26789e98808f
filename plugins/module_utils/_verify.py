# Copyright: drguard maintainers
# Apache License 2.0
"""The artifact gate's consumer side: :class:`Verifier`, the backend of ``verify_artifacts`` (private).

Manifest checks first (envelope, signatures against the trust policy, expiry, rollback,
staleness), then artifact names, then every artifact in parallel, then strict mode, then
the trusted-state update (docs/manifest.md). Every failure raises :class:`VerifyError`;
:attr:`Verifier.result` holds the structured result at any point (failures included), so
the module reports it with the error.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from ansible_collections.drguard.sandbox.plugins.module_utils import _artifacts as art
from ansible_collections.drguard.sandbox.plugins.module_utils import _manifest as mf
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import LocationError
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import S3Location
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import is_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_prefix
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import parse_s3
from ansible_collections.drguard.sandbox.plugins.module_utils._s3_location import s3_uri
from ansible_collections.drguard.sandbox.plugins.module_utils.drill import utcnow

MAX_DOCUMENT = 64 * 1024 * 1024

# The AWS SDK (boto3, botocore, amazon.aws: most of a module's start-up) and the trusted
# state (which imports it) are loaded on first use: a local backup set without a trusted
# state is verified without ever importing them (see verify_artifacts' main()).
_TRUSTED_STATE = "ansible_collections.drguard.sandbox.plugins.module_utils._trusted_state"


def _trusted_state():
    # A plain import statement (inside the function: lazy), never importlib: Ansible packs a
    # module's module_utils by reading its import statements, and a name in a string is not packed.
    from ansible_collections.drguard.sandbox.plugins.module_utils import _trusted_state  # noqa: PLC0415
    return _trusted_state


def _boto_errors() -> tuple:
    """botocore's ClientError and BotoCoreError once botocore is loaded; () before (nothing raised them)."""
    exc = sys.modules.get("botocore.exceptions")
    return (exc.ClientError, exc.BotoCoreError) if exc else ()


def _state_errors() -> tuple:
    mod = sys.modules.get(_TRUSTED_STATE)
    return (mod.StateError,) if mod else ()


def sentence(text) -> str:
    return _trusted_state().sentence(text)


class VerifyError(Exception):
    """The backup set is not verified; the message says why and what to do.

    ``aws_error`` is the boto exception behind it, when an AWS call is what failed
    (the module reports it with ``fail_json_aws``).
    """

    def __init__(self, msg: str, aws_error: BaseException | None = None):
        super().__init__(msg)
        self.aws_error = aws_error


class Verifier:
    """Verify one backup set against its signed manifest (the options of ``verify_artifacts``).

    ``client(service, **kwargs)`` returns a client that retries transient errors
    (``_aws.aws_client`` bound to the module); ``warn(msg)`` reports a warning.
    Local locations in ``params`` are made absolute and normalized in place.
    """

    def __init__(self, params: dict, client, *, warn, check_mode: bool = False):
        self.p = params
        self._client = client
        self.warn = warn
        self.check_mode = check_mode
        # Local locations are made absolute and normalized: failure sources are handed
        # as-is to quarantine_artifact, which acts only on absolute normalized paths.
        for key in ("manifest", "source", "trusted_state"):
            if self.p[key] and not is_s3(self.p[key]):
                self.p[key] = os.path.abspath(os.path.expanduser(self.p[key]))
        self.workers = self.p["workers"] or os.cpu_count() or 1
        self._s3 = None
        self.result = {"changed": False, "verified": False, "failures": [], "artifacts": [],
                       "manifest": {"location": self.p["manifest"], "sha256": None, "payload_sha256": None,
                                    "backup_set": None, "sequence": None, "created_at": None,
                                    "expires_at": None, "tier": None, "keyids": []},
                       "bytes_hashed": 0, "trusted_state_updated": False}

    # ------------------------------------------------------------------ clients and reads
    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = self._client("s3", config={"max_pool_connections": max(10, self.workers + 2)})
        return self._s3

    def _kms(self, region=None):
        extra = {"region": region} if region else {}
        return self._client("kms", **extra)

    @staticmethod
    def read_local(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_DOCUMENT + 1)
        except OSError as exc:
            raise VerifyError("Cannot read the %s %s: %s" % (what, path, exc.strerror)) from None
        if len(data) > MAX_DOCUMENT:
            raise VerifyError("The %s %s is larger than %d bytes" % (what, path, MAX_DOCUMENT))
        return data

    def read_s3(self, loc: S3Location, what: str):
        """(bytes, version id, ETag) of an S3 document."""
        kwargs = {"Bucket": loc.bucket, "Key": loc.key}
        if loc.version_id:
            kwargs["VersionId"] = loc.version_id
        try:
            resp = self.s3.get_object(**kwargs)
            if resp.get("ContentLength", 0) > MAX_DOCUMENT:
                raise VerifyError("The %s %s is larger than %d bytes" % (what, loc.uri, MAX_DOCUMENT))
            data = resp["Body"].read()
        except _boto_errors()[:1] as exc:
            from ansible_collections.drguard.sandbox.plugins.module_utils._aws import error_code  # noqa: PLC0415
            raise VerifyError("Cannot read the %s %s: %s" % (what, loc.uri, error_code(exc) or exc)) from None
        except _boto_errors() as exc:
            raise VerifyError("Cannot read the %s %s: %s" % (what, loc.uri, exc)) from None
        version = resp.get("VersionId")
        return data, (None if version in (None, "null") else version), resp.get("ETag")

    # ------------------------------------------------------------------ steps
    def run(self) -> str:
        """Verify; the success message. :attr:`result` is complete either way."""
        self.verify()
        return self.finish()

    def verify(self) -> None:
        """Every check, reading only (raises VerifyError on any failure); :meth:`finish` records the result."""
        p = self.p
        if self.workers < 1:
            raise VerifyError("workers must be at least 1")
        if p["max_age"] is not None and p["max_age"] < 0:
            raise VerifyError("max_age must be a non-negative number of seconds")
        if p["max_clock_skew"] < 0:
            raise VerifyError("max_clock_skew must be a non-negative number of seconds")
        source_loc, manifest_loc, store, policy, envelope_bytes, manifest_source, state = self.read_inputs()

        m = self.result["manifest"]
        m.update(location=manifest_source, sha256=mf.sha256_hex(envelope_bytes))
        now = utcnow()
        try:
            envelope = mf.parse_envelope(envelope_bytes)
            m["payload_sha256"] = mf.sha256_hex(envelope.payload)
            keyids = mf.verify_signatures(envelope, policy)
            statement = mf.parse_statement(envelope.payload)
        except mf.ManifestError as exc:
            self.manifest_failures([exc], manifest_source)
        m.update(backup_set=statement.backup_set, sequence=statement.sequence, created_at=statement.created_at,
                 expires_at=statement.expires_at, tier=statement.tier, keyids=keyids)
        other_set = mf.check_backup_set(statement, p["expected_backup_set"])
        if other_set:
            self.manifest_failures([other_set], manifest_source)
        problems = mf.check_times(statement, now, p["max_age"], p["max_clock_skew"])
        rollback = mf.check_rollback(state, statement, m["sha256"], m["payload_sha256"])
        if rollback:
            problems.insert(1 if problems and problems[0].reason == "manifest_expired" else 0, rollback)
        if problems:
            self.manifest_failures(problems, manifest_source)

        entries, failures, safe = self.check_names(statement, manifest_source)
        results = self.check_artifacts(safe, source_loc)
        for entry, fail in results:
            entries[entry["name"]] = entry
            if fail:
                failures.append(fail)
        if p["strict"]:
            failures.extend(self.unlisted(statement, source_loc, manifest_loc, store.loc if store else None))
        self.result["artifacts"] = [entries[n] for n in statement.artifacts]
        self.result["failures"] = failures
        if failures:
            reasons = sorted({f["reason"] for f in failures})
            raise VerifyError("Backup set %s sequence %d failed verification: %d failure(s) (%s); quarantine the "
                              "failing objects and do not restore them" % (statement.backup_set, statement.sequence,
                                                                           len(failures), ", ".join(reasons)))
        self._verified = (store, statement, state, now)

    def finish(self) -> str:
        """After :meth:`verify` succeeded: update the trusted state; the success message."""
        store, statement, state, now = self._verified
        if store and self.p["update_trusted_state"]:
            self.record(store, statement, state, now)
        # Last: nothing that can still fail comes after this.
        self.result["verified"] = True
        return ("Backup set %s sequence %d verified: %d artifact(s), %d byte(s) hashed"
                % (statement.backup_set, statement.sequence, len(statement.artifacts), self.result["bytes_hashed"]))

    def read_inputs(self):
        """Source, manifest, trust policy and trusted state, read before any verification."""
        p = self.p
        try:
            if is_s3(p["source"]):
                source_loc = parse_prefix(p["source"], "source")
            elif not os.path.isdir(p["source"]):
                raise VerifyError("Source %s is not a directory; give a local directory or s3://bucket/prefix/"
                                  % p["source"])
            else:
                source_loc = None
            manifest_loc = parse_s3(p["manifest"], "manifest") if is_s3(p["manifest"]) else None
            store = _trusted_state().TrustedState(p["trusted_state"], lambda: self.s3) if p["trusted_state"] else None
            policy = mf.load_trust_policy(self.read_local(p["trust_policy"], "trust policy"), self._kms)
            if policy.threshold > len(policy.keys):
                self.warn("The trust policy can never be met: threshold %d but only %d distinct key(s) "
                          "(%d listed); every manifest will be threshold_not_met"
                          % (policy.threshold, len(policy.keys), policy.entries))
            if manifest_loc:
                envelope_bytes, version, _etag = self.read_s3(manifest_loc, "manifest")
                manifest_source = s3_uri(manifest_loc.bucket, manifest_loc.key, version)
            else:
                envelope_bytes = self.read_local(p["manifest"], "manifest")
                manifest_source = p["manifest"]
            state = store.read() if store else {}
        except (LocationError, mf.PolicyError, *_state_errors()) as exc:
            raise VerifyError(sentence(exc)) from None
        except _boto_errors() as exc:
            raise VerifyError("Could not fetch a KMS public key of the trust policy", aws_error=exc) from None
        return source_loc, manifest_loc, store, policy, envelope_bytes, manifest_source, state

    def manifest_failures(self, errors: list, manifest_source: str):
        self.result["failures"] = [art.failure(None, e.reason, e.detail, manifest_source) for e in errors]
        raise VerifyError("The manifest %s failed verification (%s): %s; no artifact was read"
                          % (manifest_source, ", ".join(e.reason for e in errors),
                             "; ".join(e.detail for e in errors)))

    @staticmethod
    def check_names(statement, manifest_source):
        entries, failures, safe = {}, [], []
        for name, item in statement.artifacts.items():
            problem = mf.unsafe_name_problem(name)
            if problem is None:
                safe.append(item)
                continue
            entries[name] = {"name": name, "verified": False, "sha256": item.sha256, "size": item.size,
                             "seconds": 0.0, "reason": "unsafe_name", "source": None, "version_id": None,
                             "kind": item.kind, "expect": item.expect}
            failures.append(art.failure(name, "unsafe_name", "artifact name %r is unsafe: %s; the manifest that "
                                        "lists it is the source" % (name, problem), manifest_source))
        return entries, failures, safe

    def check_artifacts(self, items: list, source_loc):
        check = art.Check(self.p["mode"], self.p["require_object_lock"] if source_loc else "none", utcnow())
        counter = []
        if source_loc:
            def one(item):
                return art.verify_s3(self.s3, source_loc.bucket, source_loc.key, item, check, counter)
        else:
            # ``workers`` bounds the threads that read and hash: with two of them for each
            # artifact, each artifact's reads run in a thread of their own next to its hashing.
            read_ahead = self.workers >= 2 * len(items)

            def one(item):
                return art.verify_local(self.p["source"], item, check, counter, read_ahead=read_ahead)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(one, items))
        self.result["bytes_hashed"] = sum(counter)
        return results

    def unlisted(self, statement, source_loc, manifest_loc, state_loc):
        names = set(statement.artifacts)
        if source_loc:
            exclude = [loc.key for loc in (manifest_loc, state_loc) if loc and loc.bucket == source_loc.bucket]
            try:
                return art.unlisted_s3(self.s3, source_loc.bucket, source_loc.key, names, exclude)
            except _boto_errors() as exc:
                raise VerifyError("Could not list %s for strict mode; grant s3:ListBucket or set strict=false"
                                  % self.p["source"], aws_error=exc) from None
        exclude = [self.p["manifest"]] + ([self.p["trusted_state"]] if self.p["trusted_state"] else [])
        return art.unlisted_local(self.p["source"], names, [e for e in exclude if not is_s3(e)])

    # ------------------------------------------------------------------ trusted state
    def record(self, store, statement, state, now):
        """Record the verified manifest; a state that cannot be updated fails (never verified)."""
        m = self.result["manifest"]
        if self.check_mode:
            current = state.get(statement.backup_set)
            self.result["changed"] = not (current and current["sequence"] == statement.sequence
                                          and current["manifest_sha256"] == m["sha256"])
            return
        try:
            written = store.record(statement.backup_set, statement.sequence, m["sha256"], m["payload_sha256"],
                                   now=now, state=state)
        except mf.ManifestError as exc:  # someone else recorded a newer or another manifest meanwhile
            self.result["failures"] = [art.failure(None, exc.reason, exc.detail, m["location"])]
            raise VerifyError("The trusted state changed during verification: %s" % exc.detail) from None
        except _state_errors() as exc:
            raise VerifyError("%s; the backup set is not verified until its trusted state is updated" % exc) from None
        self.result["trusted_state_updated"] = self.result["changed"] = written


# ---------------------------------------------------------------------- early local run

class NeedsAws(Exception):
    """Raised by the client factory of an :class:`EarlyRun`: this verification needs an AWS client."""


class EarlyRun:
    """A verification of a local backup set started before the module object exists.

    ``verify_artifacts``' main() starts it from the raw module arguments, so that a local set
    needs neither amazon.aws' AnsibleAWSModule nor the AWS SDK (importing them takes longer than
    everything else before the first artifact byte). The run is read-only (:meth:`Verifier.verify`:
    every check in the usual order, manifest first, nothing written); the module uses its result
    only when its own validated options are exactly those the run used (:meth:`matches`), and
    records the trusted state itself afterwards. Anything else (an S3 location, a KMS key in
    the trust policy, options the module would refuse, an unexpected error) gives no early run:
    the module then verifies as usual.
    """

    def __init__(self, params: dict, verifier: Verifier, warnings: list, error: VerifyError | None):
        self.params, self.verifier, self.warnings, self.error = params, verifier, warnings, error

    @classmethod
    def start(cls, raw, spec: dict) -> EarlyRun | None:
        """The early run of the raw arguments ``raw`` (None when there is none)."""
        from ansible.module_utils.common.arg_spec import ArgumentSpecValidator  # noqa: PLC0415

        if not isinstance(raw, dict):
            return None
        names = set(spec) | {alias for option in spec.values() for alias in option.get("aliases", ())}
        checked = ArgumentSpecValidator(spec).validate({k: v for k, v in raw.items() if k in names})
        if checked.error_messages:
            return None
        params = dict(checked.validated_parameters)
        if any(isinstance(params.get(k), str) and is_s3(params[k]) for k in ("manifest", "source", "trusted_state")):
            return None

        def no_client(service, **_kwargs):
            raise NeedsAws(service)
        warnings = []
        verifier = Verifier(dict(params), no_client, warn=warnings.append)
        error = None
        try:
            verifier.verify()
        except VerifyError as exc:
            if exc.aws_error is not None:
                return None
            error = exc
        except Exception:  # noqa: BLE001 - NeedsAws or anything unexpected: the module's own run decides
            return None
        return cls(params, verifier, warnings, error)

    def matches(self, params: dict) -> bool:
        """Whether the module's validated ``params`` hold exactly the options this run used."""
        return all(k in params and params[k] == v for k, v in self.params.items())

    def adopt(self, client, *, warn, check_mode: bool) -> Verifier:
        """The run's Verifier, bound to the module (client factory, warnings, check mode); warnings replayed."""
        v = self.verifier
        v._client, v.warn, v.check_mode = client, warn, check_mode
        for msg in self.warnings:
            warn(msg)
        return v
