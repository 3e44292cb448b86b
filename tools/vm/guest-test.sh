#!/bin/sh
# Runs inside the VM (tools/vm.sh test): the VM test tier.
# Runs `deno test` on ${BLKSNAP_VM_TESTS:-tests/vm/} (extra arguments go to
# deno test) and reports the counts from deno's summary line, e.g.
#   ok | 3 passed | 0 failed | 1 ignored (1s)
# as a protocol line; the host decides the verdict from it.
tests=${BLKSNAP_VM_TESTS:-tests/vm/}
log=/tmp/deno-test.log
{
  # shellcheck disable=SC2086 # BLKSNAP_VM_TESTS may list several paths
  deno test -A --no-check "$@" $tests
  echo $? >/tmp/deno-test.status
} 2>&1 | tee "$log"
status=$(cat /tmp/deno-test.status 2>/dev/null || echo 1)

esc=$(printf '\033')
summary=$(sed "s/$esc\[[0-9;]*m//g" "$log" | grep -E '^(ok|FAILED) \| [0-9]+ passed' | tail -n 1)
if [ -n "$summary" ]; then
  count() { echo "$summary" | sed -n "s/.*| \([0-9][0-9]*\) $1.*/\1/p"; }
  echo "@@BLKSNAP-TEST-SUMMARY passed=$(count passed) failed=$(count failed) ignored=$(count ignored)@@"
fi
exit "$status"
