#!/usr/bin/env bash
# The project's front door: installs what is missing (tools/setup.sh), then
#
#   tools/dev.sh demo    the main job: the demo, natively when this kernel has
#                        ublk, otherwise inside the test VM
#   tools/dev.sh test    every test: fmt, lint, type check and unit tests
#                        natively, then the VM tier; fails if any test fails,
#                        is ignored inside the VM, or did not run
#   tools/dev.sh bench   the benchmark, in the VM (results in bench/results/)
#   tools/dev.sh deno …  deno from the project's cache
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

bash tools/setup.sh
# shellcheck source=/dev/null
source "${BLKSNAP_CACHE:-$HOME/.cache/blksnap-deno}/env.sh"
export PATH="$(dirname "$DENO"):$PATH"
export DENO_NO_UPDATE_CHECK=1

has_ublk() {
  [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null && [[ -e /dev/ublk-control ]]
}

# Prints the "N passed | M failed | K ignored" counts of a deno test log.
counts() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E '^(ok|FAILED) \| ' | tail -1 |
    awk -F'|' '{ p=0; f=0; i=0
      for (k = 2; k <= NF; k++) {
        if ($k ~ /passed/) p = $k + 0; else if ($k ~ /failed/) f = $k + 0; else if ($k ~ /ignored/) i = $k + 0 }
      print p, f, i }'
}

cmd=${1:-}
shift || true
case $cmd in
  demo)
    if has_ublk; then
      exec deno run -A tools/demo.ts "$@"
    fi
    echo "dev: this kernel has no ublk; running the demo in the test VM" >&2
    exec bash tools/vm.sh demo "$@"
    ;;
  test)
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    echo "==> unit tier: fmt, lint, type check, unit tests" >&2
    set +e
    deno task ok 2>&1 | tee "$log"
    unit_status=${PIPESTATUS[0]}
    set -e
    read -r up uf ui < <(counts "$log")
    up=${up:-0} uf=${uf:-0} ui=${ui:-0}
    if [[ $unit_status -ne 0 ]]; then
      echo "unit: FAILED (deno task ok exited $unit_status)" >&2
      echo "${up} passed, $((uf > 0 ? uf : 1)) failed"
      exit 1
    fi
    if [[ $up -eq 0 ]]; then
      echo "unit: no test ran" >&2
      exit 1
    fi
    echo "==> VM tier" >&2
    set +e
    # The tier takes about 25 minutes on a quiet 2-core host (1500 s); the VM's
    # default limit (1800 s) left too little margin for a slower or busier machine.
    bash tools/vm.sh test --timeout 2400 2>&1 | tee "$log"
    vm_status=${PIPESTATUS[0]}
    set -e
    vp=$(sed -n 's/^vm: \([0-9]*\) passed.*/\1/p' "$log" | tail -1)
    vf=$(sed -n 's/^vm: [0-9]* passed, \([0-9]*\) failed.*/\1/p' "$log" | tail -1)
    vp=${vp:-0} vf=${vf:-0}
    echo "unit: ${up} passed, ${uf} failed, ${ui} ignored (VM-only tests are ignored natively)"
    echo "vm: ${vp} passed, ${vf} failed"
    if [[ $vm_status -ne 0 ]]; then
      echo "$((up + vp)) passed, $((uf + vf > 0 ? uf + vf : 1)) failed"
      exit 1
    fi
    echo "$((up + vp)) passed, $((uf + vf)) failed"
    ;;
  bench)
    exec bash tools/vm.sh bench "$@"
    ;;
  deno)
    exec deno "$@"
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
