#!/usr/bin/env bash
# `make drill` / `make drill-tampered`: seed the demo world in the embedded emulator,
# sign the backup set, run the drill, then prove independently that nothing of the
# drill remains. Runs under tools/emulator.py run (which stops the emulator after).
set -uo pipefail
mode=${1:-passing}
cd "$(dirname "$0")/.."
drill_id=$(python -c 'import sys; sys.path.insert(0, ".collections"); from ansible_collections.drguard.sandbox.plugins.module_utils.drill import new_drill_id; print(new_drill_id())')
demo="drill-runs/demo-${drill_id}"

python tools/seed_demo.py --out "$demo" --mode "$mode" --drill-id "$drill_id" || exit 1
key_dir=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["key_dir"])' "$demo/world.json")
ansible-playbook playbooks/sign_backup.yml -e @"$demo/sign-vars.yml"
sign_rc=$?
rm -rf "$key_dir"   # the private key never outlives signing
[ $sign_rc -eq 0 ] || { echo "signing failed"; exit 1; }

ansible-playbook playbooks/drill.yml -e @"$demo/drill-vars.yml" -e drill_output_root="$PWD/drill-runs"
drill_rc=$?

python tools/leftovers.py --drill-id "$drill_id"
left_rc=$?
report="drill-runs/${drill_id}/drill-report.json"
echo
echo "drill ${drill_id}: exit ${drill_rc}; report ${report} (summary drill-runs/${drill_id}/drill-report.md)"
if [ "$mode" = tampered ]; then
  # The tampered demo must halt (non-zero), quarantine and leave nothing behind.
  python - "$report" <<'PY' || exit 1
import json, sys
r = json.load(open(sys.argv[1]))
print("outcome:", r["outcome"], "| failed phase:", r["failed_phase"], "| quarantined:", len(r["quarantine"]),
      "| teardown remaining:", (r["teardown"] or {}).get("remaining"))
sys.exit(0 if r["outcome"] == "halted" and r["quarantine"] else 1)
PY
  [ $left_rc -eq 0 ] || exit 1
  [ $drill_rc -ne 0 ] || { echo "tampered drill did not fail"; exit 1; }
  exit $drill_rc
fi
[ $left_rc -eq 0 ] || exit 1
exit $drill_rc
