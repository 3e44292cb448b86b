#!/usr/bin/env bash
# Boot the blksnap test VM (QEMU/TCG, Debian 6.12 cloud kernel, busybox
# initramfs) and run something inside it.
#
#   tools/vm.sh run   [OPTIONS] -- CMD [ARGS...]   run CMD in the guest (cwd /blksnap)
#   tools/vm.sh test  [OPTIONS] [-- DENO-TEST-ARGS] the VM test tier (tests/vm/)
#   tools/vm.sh bench [OPTIONS] [-- ARGS]           bench/bench.ts; /out -> bench/results
#   tools/vm.sh demo  [OPTIONS] [-- ARGS]           tools/demo.ts
#   tools/vm.sh shell [OPTIONS]                     a shell on the console (Ctrl-A X quits)
#
# OPTIONS:
#   --out DIR        copy what the guest leaves in /out to DIR on the host
#   --in PATH        copy a host file or directory into the guest at /in
#   --timeout SECS   kill the VM after SECS (default 1800; exit status 124)
#   --mem SIZE       guest memory (default 6G)      --smp N   vCPUs (default 2)
#
# Environment: BLKSNAP_* variables are forwarded into the guest (which also gets
# BLKSNAP_IN_VM=1 and BLKSNAP_OUT_DIR=/out).  BLKSNAP_VM_TESTS overrides the
# test path for `test` (a path inside the guest, relative to /blksnap).
# BLKSNAP_VM_VERBOSE=1 shows firmware/kernel boot output too.
# Knobs for experiments: BLKSNAP_VM_QEMU (binary), BLKSNAP_VM_CPU (default max),
# BLKSNAP_VM_ACCEL (default tcg,thread=multi), BLKSNAP_VM_BIOS=seabios,
# BLKSNAP_VM_KARGS (extra kernel arguments), BLKSNAP_VM_KEEP=1 (keep the run
# directory with console.log).
#
# Exit status: the guest command's status; 124 on timeout; 125 when the VM died
# without reporting one (kernel panic, qemu failure).
set -euo pipefail
shopt -s extglob

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VM_DIR=$ROOT/tools/vm

TIMEOUT=1800
MEM=6G
SMP=2
OUT_DIR=''
IN_PATH=''
MODE=''
CMD=()

log() { printf 'vm: %s\n' "$*" >&2; }
die() {
  printf 'vm: ERROR: %s\n' "$*" >&2
  exit 2
}
usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}
now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# POSIX-sh single-quoting, so any argument survives the trip into the guest.
shquote() {
  local s=${1//\'/\'\\\'\'}
  printf "'%s'" "$s"
}

parse_args() {
  (($#)) || usage
  MODE=$1
  shift
  case $MODE in run | test | bench | demo | shell) ;; -h | --help | help) usage 0 ;; *) die "unknown mode '$MODE'" ;; esac
  while (($#)); do
    case $1 in
      --out) OUT_DIR=${2:?--out needs a directory} && shift 2 ;;
      --out=*) OUT_DIR=${1#*=} && shift ;;
      --in) IN_PATH=${2:?--in needs a path} && shift 2 ;;
      --in=*) IN_PATH=${1#*=} && shift ;;
      --timeout) TIMEOUT=${2:?} && shift 2 ;;
      --timeout=*) TIMEOUT=${1#*=} && shift ;;
      --mem) MEM=${2:?} && shift 2 ;;
      --mem=*) MEM=${1#*=} && shift ;;
      --smp) SMP=${2:?} && shift 2 ;;
      --smp=*) SMP=${1#*=} && shift ;;
      --) shift && CMD=("$@") && break ;;
      -h | --help) usage 0 ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ $MODE == run ]] || die "unexpected argument '$1'"
        CMD=("$@") && break
        ;;
    esac
  done
  [[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds"
  [[ -z $IN_PATH || -e $IN_PATH ]] || die "--in $IN_PATH does not exist"
  case $MODE in
    run) ((${#CMD[@]})) || die "run needs a command: tools/vm.sh run -- CMD [ARGS...]" ;;
    test) CMD=(sh tools/vm/guest-test.sh "${CMD[@]}") ;;
    bench)
      CMD=(deno run -A --no-check bench/bench.ts "${CMD[@]}")
      [[ -n $OUT_DIR ]] || OUT_DIR=$ROOT/bench/results
      ;;
    demo) CMD=(deno run -A --no-check tools/demo.ts "${CMD[@]}") ;;
    shell) CMD=(sh) ;;
  esac
}

# The project's files, NUL-separated: tracked plus untracked-but-not-ignored,
# as they are on disk now (so new files are in without a commit).
project_files() {
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z -co --exclude-standard
  else
    (cd "$ROOT" && find . -mindepth 1 \( -name .git -o -name .cache -o -name node_modules \) -prune \
      -o ! -type d -printf '%P\0')
  fi
}

# The per-run cpio: the project at /blksnap, /in, the command and environment.
build_run_cpio() {
  local out=$1 stage=$RUN_DIR/stage f name
  mkdir -p "$stage/blksnap" "$stage/etc/blksnap"
  project_files |
    while IFS= read -r -d '' f; do
      [[ $f == .git/* || $f == .cache/* || $f == */.cache/* ]] && continue
      [[ -e $ROOT/$f || -L $ROOT/$f ]] && printf '%s\0' "$f"
    done | tar -C "$ROOT" --null -T - -cf - | tar -C "$stage/blksnap" -xf -
  if [[ -n $IN_PATH ]]; then
    mkdir -p "$stage/in"
    if [[ -d $IN_PATH ]]; then cp -a "$IN_PATH/." "$stage/in/"; else cp -a "$IN_PATH" "$stage/in/"; fi
  fi
  {
    echo 'cd /blksnap || exit 1'
    printf 'exec'
    for f in "${CMD[@]}"; do printf ' %s' "$(shquote "$f")"; done
    echo
  } >"$stage/etc/blksnap/run.sh"
  while IFS= read -r name; do
    [[ $name == BLKSNAP_CACHE ]] && continue
    printf 'export %s=%s\n' "$name" "$(shquote "${!name}")"
  done < <(compgen -e | grep -E '^BLKSNAP_[A-Za-z0-9_]*$' || true) >"$stage/etc/blksnap/env.sh"
  echo "$MODE" >"$stage/etc/blksnap/mode"
  (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out"
}

qemu_cmd() {
  local d datadirs=()
  # QEMU comes from the cache (see setup.sh), with its own firmware files.
  IFS=: read -ra datadirs <<<"${QEMU_DATADIRS:-}"
  QEMU_ARGV=("${BLKSNAP_VM_QEMU:-$QEMU}")
  for d in "${datadirs[@]}"; do QEMU_ARGV+=(-L "$d"); done
  # qboot: a minimal firmware that boots -kernel faster than SeaBIOS.
  [[ -f ${datadirs[0]:-}/qboot.rom && ${BLKSNAP_VM_BIOS:-qboot} == qboot ]] && QEMU_ARGV+=(-bios "${datadirs[0]}/qboot.rom")
  QEMU_ARGV+=(
    -accel "${BLKSNAP_VM_ACCEL:-tcg,thread=multi}" -cpu "${BLKSNAP_VM_CPU:-max}" -smp "$SMP" -m "$MEM"
    -M "${BLKSNAP_VM_MACHINE:-pc}" -nodefaults -no-user-config -nographic -serial mon:stdio
    -no-reboot
    -kernel "$KERNEL_VMLINUZ" -initrd "$RUN_DIR/initrd.cpio"
    -append "console=ttyS0 $([[ ${BLKSNAP_VM_VERBOSE:-0} == 1 ]] || echo quiet) panic=-1 oops=panic ${BLKSNAP_VM_KARGS:-}"
  )
}

# Reads the console from stdin.  Shows it live (minus the protocol and payload
# lines; boot noise only with BLKSNAP_VM_VERBOSE=1), keeps a full log, writes the
# /out payload and the guest's exit status into $RUN_DIR.
console_filter() {
  local line state=boot t0=$1 verbose=${BLKSNAP_VM_VERBOSE:-0}
  exec 3>"$RUN_DIR/console.log" 4>"$RUN_DIR/out.b64"
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    case $state in
      payload)
        case $line in
          @@BLKSNAP-OUT-END@@) state=run ;;
          *) printf '%s\n' "$line" >&4 ;;
        esac
        continue
        ;;
    esac
    printf '%s\n' "$line" >&3
    case $line in
      *@@BLKSNAP-CMD-START*)
        state=run
        line=${line#*uptime=}
        log "guest command starting $(secs "$t0" "$(now)")s after qemu start (guest uptime ${line%@@}s)"
        ;;
      *@@BLKSNAP-CMD-END*) echo "${line#*uptime=}" | tr -d '@' >"$RUN_DIR/end-uptime" ;;
      *@@BLKSNAP-OUT-SHA256=*) line=${line#*=} && echo "${line%@@}" >"$RUN_DIR/out.sha256" ;;
      *@@BLKSNAP-OUT-BEGIN@@) state=payload ;;
      *@@BLKSNAP-TEST-SUMMARY*) echo "$line" >"$RUN_DIR/test-summary" ;;
      *@@BLKSNAP-VM-EXIT=*@@)
        line=${line#*=} && echo "${line%@@}" >"$RUN_DIR/status"
        state=finished
        ;;
      *)
        if [[ $state == run ]]; then
          printf '%s\n' "$line"
        elif [[ $verbose == 1 ]]; then
          # Firmware output carries terminal resets/modes; keep them off the terminal.
          printf '%s\n' "${line//$'\e'?(\[)*([0-9;?])[a-zA-Z]/}"
        fi
        ;;
    esac
  done
}

extract_out() {
  [[ -s $RUN_DIR/out.b64 ]] || return 0
  local want got
  base64 -d <"$RUN_DIR/out.b64" >"$RUN_DIR/out.tgz" || { log "corrupt /out payload"; return 1; }
  want=$(cat "$RUN_DIR/out.sha256" 2>/dev/null || true)
  got=$(sha256sum <"$RUN_DIR/out.tgz" | cut -d' ' -f1)
  [[ $want == "$got" ]] || { log "/out payload checksum mismatch"; return 1; }
  if [[ -z $OUT_DIR ]]; then
    log "guest left files in /out; pass --out DIR to keep them"
    return 0
  fi
  mkdir -p "$OUT_DIR"
  tar -xzf "$RUN_DIR/out.tgz" -C "$OUT_DIR" --no-same-owner
  log "copied guest /out to $OUT_DIR ($(tar -tzf "$RUN_DIR/out.tgz" | grep -vc '/$') files)"
}

QPID=''
# shellcheck disable=SC2317 # invoked from the EXIT trap
cleanup() {
  if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
    kill -TERM "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
  fi
  [[ -n ${RUN_DIR:-} && ${BLKSNAP_VM_KEEP:-0} != 1 ]] && rm -rf "$RUN_DIR"
  return 0
}

# Boot, stream, wait; sets VM_STATUS.
boot_vm() {
  local t0 fpid rc
  mkfifo "$RUN_DIR/console"
  t0=$(now)
  # timeout(1) forwards TERM/INT to qemu, so killing $QPID stops the VM.
  timeout -k 10 "$TIMEOUT" "${QEMU_ARGV[@]}" </dev/null >"$RUN_DIR/console" 2>&1 &
  QPID=$!
  console_filter "$t0" <"$RUN_DIR/console" &
  fpid=$!
  # `wait` (unlike a foreground job) lets the INT/TERM traps run at once.
  rc=0 && wait "$QPID" || rc=$?
  QPID=''
  wait "$fpid" || true
  VM_WALL=$(secs "$t0" "$(now)")
  if ((rc == 124)); then
    log "TIMEOUT: the VM did not finish within ${TIMEOUT}s; killed it"
    VM_STATUS=124
  elif [[ -s $RUN_DIR/status ]]; then
    VM_STATUS=$(<"$RUN_DIR/status")
  else
    log "the VM stopped without reporting an exit status (qemu exit $rc; kernel panic or qemu crash?)"
    if ! grep -q '@@BLKSNAP-CMD-START' "$RUN_DIR/console.log"; then
      log "last console lines (boot):"
      tail -n 30 "$RUN_DIR/console.log" | sed 's/^/  | /' >&2
    fi
    VM_STATUS=125
  fi
}

# The final verdict of the VM test tier; prints "vm: N passed, M failed[, K ignored]".
test_verdict() {
  local s passed=0 failed=0 ignored=0 ok=1
  s=$(cat "$RUN_DIR/test-summary" 2>/dev/null || true)
  if [[ -z $s ]]; then
    log "FAIL: no deno test summary (status $VM_STATUS)"
    ok=0
  else
    [[ $s =~ passed=([0-9]+) ]] && passed=${BASH_REMATCH[1]}
    [[ $s =~ failed=([0-9]+) ]] && failed=${BASH_REMATCH[1]}
    [[ $s =~ ignored=([0-9]+) ]] && ignored=${BASH_REMATCH[1]}
    ((failed == 0)) || { log "FAIL: $failed test(s) failed" && ok=0; }
    ((ignored == 0)) || { log "FAIL: $ignored test(s) ignored; the VM tier must run everything" && ok=0; }
    ((passed > 0)) || { log "FAIL: no tests ran" && ok=0; }
    [[ $VM_STATUS == 0 ]] || { log "FAIL: deno test exited with status $VM_STATUS" && ok=0; }
  fi
  if ((ignored)); then
    echo "vm: $passed passed, $failed failed, $ignored ignored"
  else
    echo "vm: $passed passed, $failed failed"
  fi
  if ((ok)); then VM_STATUS=0; elif [[ $VM_STATUS == 0 ]]; then VM_STATUS=1; fi
}

main() {
  local t_start base shell_status
  t_start=$(now)
  parse_args "$@"
  [[ -z $OUT_DIR || $OUT_DIR == /* ]] || OUT_DIR=$PWD/$OUT_DIR

  "$ROOT/tools/setup.sh" || die "tools/setup.sh failed"
  # shellcheck disable=SC1091
  . "${BLKSNAP_CACHE:-$HOME/.cache/blksnap-deno}/env.sh"
  base=$("$VM_DIR/build-base.sh") || die "building the base initramfs failed"

  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/blksnap-vm.XXXXXX")
  trap cleanup EXIT
  trap 'log "interrupted; stopping the VM"; exit 130' INT
  trap 'log "terminated; stopping the VM"; exit 143' TERM HUP

  build_run_cpio "$RUN_DIR/run.cpio"
  cat "$base" "$RUN_DIR/run.cpio" >"$RUN_DIR/initrd.cpio"
  qemu_cmd
  log "booting $KERNEL_RELEASE (TCG, ${SMP} vCPUs, $MEM; timeout ${TIMEOUT}s; setup+initramfs $(secs "$t_start" "$(now)")s)"

  if [[ $MODE == shell ]]; then
    # Interactive: the console is the terminal; Ctrl-A X quits qemu.
    shell_status=0
    "${QEMU_ARGV[@]}" || shell_status=$?
    exit "$shell_status"
  fi

  boot_vm
  log "VM finished in ${VM_WALL}s (total $(secs "$t_start" "$(now)")s), guest status $VM_STATUS"
  extract_out || { [[ $VM_STATUS != 0 ]] || VM_STATUS=1; }
  [[ $MODE == test ]] && test_verdict
  exit "$VM_STATUS"
}

main "$@"
