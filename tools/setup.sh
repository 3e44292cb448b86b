#!/usr/bin/env bash
# Idempotent from-nothing setup for blksnap-deno.
#
# Installs (or finds, when already present):
#   - Debian's 6.12 cloud kernel (vmlinuz + modules) for the test VM
#   - QEMU from bookworm-backports (bookworm's QEMU 7.2 randomly corrupts
#     memory of this kernel under TCG: ~1 boot in 10 oopses in SLUB)
#   - the host Debian packages needed to build and boot the VM (and QEMU's libs),
#     with gcc and liburing-dev for the benchmark's C reference ublk server
#   - deno, pinned, from the npm package `deno`
# and writes $CACHE/env.sh for tools/vm.sh (and humans) to source.
#
# Kernel and QEMU come from a private apt configuration under the cache, so the
# system's apt sources are left untouched.  Their package lists are refreshed
# at most once a day; without network, whatever is cached is used.
#
# Cache: ${BLKSNAP_CACHE:-$HOME/.cache/blksnap-deno}.  Progress goes to stderr;
# a run with nothing to do prints nothing (BLKSNAP_VERBOSE=1 to see checks).
set -euo pipefail

DENO_VERSION=2.9.6
KERNEL_PATTERN='^linux-image-6\.12\.[0-9]+\+deb[0-9.]+-cloud-amd64-unsigned$'
# QEMU and SeaBIOS builds for bookworm (backports carry "~bpo12").
BOOKWORM_BUILD='~bpo12'
HOST_PACKAGES=(
  busybox-static cpio liburing2 e2fsprogs util-linux mount fdisk fio dmsetup
  xz-utils kmod ca-certificates git debian-archive-keyring dash bash
  gcc libc6-dev liburing-dev
  qemu-utils
)
LISTS_MAX_AGE_S=$((24 * 3600))

CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blksnap-deno}
APT_DIR=$CACHE/apt
VERBOSE=${BLKSNAP_VERBOSE:-0}

log() { printf 'setup: %s\n' "$*" >&2; }
vlog() { if [[ $VERBOSE == 1 ]]; then log "$@"; fi; }
die() {
  printf 'setup: ERROR: %s\n' "$*" >&2
  exit 1
}

# Run as root directly, otherwise through sudo (only system apt needs it).
as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

# --- host packages (system apt) ---------------------------------------------

pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

ensure_host_packages() {
  local missing=() logf=$CACHE/logs/apt-install.log
  # One dpkg-query for all (unknown packages print nothing, so count as missing).
  mapfile -t missing < <(
    dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null |
      awk -v want="$*" '$2 == "installed" { sub(/:.*/, "", $1); ok[$1] = 1 }
        END { n = split(want, w, " "); for (i = 1; i <= n; i++) if (!(w[i] in ok)) print w[i] }' || true
  )
  if ((${#missing[@]} == 0)); then
    vlog "host packages: all present"
    return
  fi
  log "installing host packages: ${missing[*]}"
  mkdir -p "$CACHE/logs"
  export DEBIAN_FRONTEND=noninteractive
  { as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    >"$logf" 2>&1 || {
    tail -n 20 "$logf" >&2
    die "apt-get install ${missing[*]} failed (log: $logf)"
  }
}

# --- private apt: kernel and QEMU from bookworm-backports / trixie ------------

APT_OPTS=()

init_private_apt() {
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -r $keyring ]] || die "$keyring missing (package debian-archive-keyring)"
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
  cat >"$APT_DIR/sources.list" <<EOF
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=$keyring] http://deb.debian.org/debian trixie main
EOF
  # Everything apt reads or writes lives under $APT_DIR; status=/dev/null so the
  # host's installed packages do not influence candidate selection.
  APT_OPTS=(
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR/cache"
    -o Dir::State::status=/dev/null
    -o Debug::NoLocking=1
    -o APT::Sandbox::User=root
  )
}

age_of() { echo $(($(date +%s) - $(stat -c %Y "$1" 2>/dev/null || echo 0))); }

# Refresh the private package lists if older than a day; 0 = fresh lists.
# After a failure, retry at most hourly so offline runs stay fast.
refresh_lists() {
  local stamp=$APT_DIR/lists.stamp attempt=$APT_DIR/lists.attempt
  (($(age_of "$stamp") < LISTS_MAX_AGE_S)) && return 0
  (($(age_of "$attempt") < 3600)) && return 1
  touch "$attempt"
  log "refreshing Debian package lists (bookworm-backports, trixie)"
  if apt-get "${APT_OPTS[@]}" -o Acquire::http::Timeout=20 -o Acquire::Retries=1 \
    update -qq >"$APT_DIR/update.log" 2>&1 && ! grep -qE '^(W|E): ' "$APT_DIR/update.log"; then
    touch "$stamp"
    return 0
  fi
  log "package list refresh failed (see $APT_DIR/update.log)"
  return 1
}

have_lists() { compgen -G "$APT_DIR/lists/*_Packages*" >/dev/null; }

# All versions of a package in the private lists, newest first.
versions_of() {
  apt-cache "${APT_OPTS[@]}" show "$1" 2>/dev/null | sed -n 's/^Version: //p' |
    sort -u | sort -r -V
}

# Newest version of $1 that matches the grep -E pattern $2 (default: any).
newest_version() {
  local v best=''
  while read -r v; do
    [[ $v =~ ${2:-.} ]] || continue
    if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
  done < <(versions_of "$1")
  [[ -n $best ]] && echo "$best"
}

# Library packages a given version of a package depends on, minus the QEMU
# data/firmware packages we fetch ourselves.
lib_depends() {
  apt-cache "${APT_OPTS[@]}" show "$1=$2" 2>/dev/null | sed -n 's/^Depends: //p' | head -n1 |
    tr ',' '\n' | sed -E 's/\|.*//; s/\(.*\)//; s/[[:space:]]//g' |
    grep -vE '^(qemu-|seabios|ipxe-qemu)' | grep . || true
}

# Decide what to use: writes $APT_DIR/picks ("kernel PKG VER", "qemu VER",
# "seabios VER", "qemu-deps PKG...").  apt-cache takes seconds, so this runs
# only after the lists changed.
compute_picks() {
  local picks=$APT_DIR/picks pkg ver best_pkg='' best_ver='' qver sver
  if [[ -s $picks && $picks -nt $APT_DIR/lists.stamp ]]; then return 0; fi
  while read -r pkg; do
    ver=$(newest_version "$pkg") || continue
    if [[ -z $best_ver ]] || dpkg --compare-versions "$ver" gt "$best_ver"; then
      best_pkg=$pkg best_ver=$ver
    fi
  done < <(apt-cache "${APT_OPTS[@]}" pkgnames linux-image-6.12 | grep -E "$KERNEL_PATTERN" || true)
  qver=$(newest_version qemu-system-x86 "$BOOKWORM_BUILD") || true
  sver=$(newest_version seabios "$BOOKWORM_BUILD") || true
  [[ -n $best_pkg && -n $qver && -n $sver ]] || return 1
  {
    echo "kernel $best_pkg $best_ver"
    echo "qemu $qver"
    echo "seabios $sver"
    echo "qemu-deps $(lib_depends qemu-system-x86 "$qver" | tr '\n' ' ')"
  } >"$picks.tmp"
  mv "$picks.tmp" "$picks"
}

pick() { sed -n "s/^$1 //p" "$APT_DIR/picks" 2>/dev/null; }

# Newest completed directory under $1 (names are package versions).
newest_cached() {
  local d
  for d in "$1"/*/.complete; do
    if [[ -e $d ]]; then basename "$(dirname "$d")"; fi
  done | sort -V | tail -n1
}

# Download PKG=VER... and extract them all into $1 (atomically).
fetch_extract() {
  local dest=$1 dl=$APT_DIR/download deb
  shift
  rm -rf "$dl" "$dest.tmp" && mkdir -p "$dl" "$dest.tmp"
  (cd "$dl" && apt-get "${APT_OPTS[@]}" download -qq "$@" >&2) || return 1
  for deb in "$dl"/*.deb; do
    dpkg-deb -x "$deb" "$dest.tmp" || die "dpkg-deb -x failed for $deb"
  done
  rm -rf "$dl" "$dest"
  mv "$dest.tmp" "$dest"
  touch "$dest/.complete"
}

# Remove other versions once a new one is in place, so the cache stays small.
prune_except() {
  local d
  for d in "$1"/*; do [[ -d $d && $d != "$2" ]] && rm -rf "$d"; done
  return 0
}

# use_component NAME DIR WANT_DIR FETCH-ARGS...: sets COMPONENT_DIR.
use_component() {
  local name=$1 root=$2 want=$3 cached
  shift 3
  if [[ -n $want && -e $want/.complete ]]; then
    vlog "$name ${want##*/}: present"
    COMPONENT_DIR=$want
    return
  fi
  if [[ -n $want ]]; then
    log "downloading $name ${want##*/}"
    if fetch_extract "$want" "$@"; then
      prune_except "$root" "$want"
      COMPONENT_DIR=$want
      return
    fi
    log "download of $name failed"
  fi
  cached=$(newest_cached "$root")
  [[ -n $cached ]] || die "no $name available: the Debian registry is unreachable and nothing is cached"
  log "using cached $name $cached"
  COMPONENT_DIR=$root/$cached
}

ensure_kernel_and_qemu() {
  local pkg="" ver="" qver="" sver="" want_k="" want_q=""
  init_private_apt
  refresh_lists || true
  if have_lists && compute_picks; then
    read -r pkg ver <<<"$(pick kernel)"
    qver=$(pick qemu) sver=$(pick seabios)
    want_k=$CACHE/kernel/$ver
    want_q=$CACHE/qemu/${qver#*:}
  elif have_lists; then
    log "no suitable kernel/QEMU packages in the private lists"
  fi
  use_component kernel "$CACHE/kernel" "$want_k" "$pkg=$ver"
  KVER_DIR=$COMPONENT_DIR
  use_component qemu "$CACHE/qemu" "$want_q" \
    "qemu-system-x86=$qver" "qemu-system-data=$qver" "seabios=$sver"
  QEMU_DIR=$COMPONENT_DIR
  # The libraries QEMU links against, remembered next to it for offline runs.
  [[ -s $QEMU_DIR/host-deps ]] || pick qemu-deps >"$QEMU_DIR/host-deps"
}

# Find vmlinuz and the module tree inside an extracted kernel package.
kernel_paths() {
  local moddir
  KERNEL_VMLINUZ=$(find "$KVER_DIR/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
  [[ -f $KERNEL_VMLINUZ ]] || die "no vmlinuz in $KVER_DIR/boot"
  KERNEL_RELEASE=${KERNEL_VMLINUZ##*/vmlinuz-}
  KERNEL_MODDIR=''
  for moddir in "$KVER_DIR/usr/lib/modules/$KERNEL_RELEASE" "$KVER_DIR/lib/modules/$KERNEL_RELEASE"; do
    [[ -d $moddir ]] && KERNEL_MODDIR=$moddir && break
  done
  [[ -n $KERNEL_MODDIR ]] || die "no module directory for $KERNEL_RELEASE in $KVER_DIR"
}

check_qemu() {
  QEMU_BIN=$QEMU_DIR/usr/bin/qemu-system-x86_64
  [[ -x $QEMU_BIN ]] || die "$QEMU_BIN missing"
  local missing
  missing=$(ldd "$QEMU_BIN" | grep 'not found' || true)
  [[ -z $missing ]] || die "QEMU libraries missing: $(echo "$missing" | tr -s ' \n\t' ' ')"
  QEMU_VERSION=$("$QEMU_BIN" --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')
  [[ -n $QEMU_VERSION ]] || die "$QEMU_BIN does not run"
}

# --- deno ----------------------------------------------------------------------

deno_ok() {
  [[ -x $1 ]] && [[ $("$1" --version 2>/dev/null | head -n1) == "deno $DENO_VERSION "* ]]
}

ensure_deno() {
  local bin=$CACHE/bin/deno npmdir=$CACHE/npm/$DENO_VERSION
  local real=$CACHE/npm/$DENO_VERSION/node_modules/@deno/linux-x64-glibc/deno
  if deno_ok "$bin"; then
    vlog "deno $DENO_VERSION: present"
    return
  fi
  [[ $(uname -m) == x86_64 ]] || die "only x86_64 hosts are supported (got $(uname -m))"
  command -v npm >/dev/null || die "npm not found; install Node.js/npm first"
  if ! deno_ok "$real"; then
    log "installing deno $DENO_VERSION from npm"
    rm -rf "$npmdir" && mkdir -p "$npmdir" "$CACHE/logs"
    # The wrapper package's install script only links the platform binary;
    # we use the platform package's binary directly, so skip scripts.
    (cd "$npmdir" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error \
      --prefix "$npmdir" "deno@$DENO_VERSION") >"$CACHE/logs/npm.log" 2>&1 || {
      tail -n 20 "$CACHE/logs/npm.log" >&2
      die "npm install deno@$DENO_VERSION failed"
    }
    [[ -f $real ]] || die "deno binary not found at $real after npm install"
    chmod +x "$real"
    deno_ok "$real" || die "$real does not report deno $DENO_VERSION"
  fi
  mkdir -p "$CACHE/bin"
  ln -sfn "$real" "$bin"
}

write_env() {
  local env=$CACHE/env.sh tmp
  tmp=$(mktemp "$CACHE/env.sh.XXXXXX")
  cat >"$tmp" <<EOF
# Generated by tools/setup.sh; source me.
export BLKSNAP_CACHE=$(printf %q "$CACHE")
export DENO=$(printf %q "$CACHE/bin/deno")
export DENO_VERSION=$DENO_VERSION
export KERNEL_PKG_VERSION=$(printf %q "${KVER_DIR##*/}")
export KERNEL_RELEASE=$(printf %q "$KERNEL_RELEASE")
export KERNEL_VMLINUZ=$(printf %q "$KERNEL_VMLINUZ")
export KERNEL_MODDIR=$(printf %q "$KERNEL_MODDIR")
export QEMU=$(printf %q "$QEMU_BIN")
export QEMU_VERSION=$(printf %q "$QEMU_VERSION")
export QEMU_DATADIRS=$(printf %q "$QEMU_DIR/usr/share/qemu:$QEMU_DIR/usr/share/seabios")
EOF
  if cmp -s "$tmp" "$env"; then rm -f "$tmp"; else mv "$tmp" "$env"; fi
}

main() {
  local t0=$SECONDS deps
  mkdir -p "$CACHE"
  pkg_installed debian-archive-keyring || ensure_host_packages debian-archive-keyring
  ensure_kernel_and_qemu
  read -ra deps <"$QEMU_DIR/host-deps"
  ensure_host_packages "${HOST_PACKAGES[@]}" "${deps[@]}"
  check_qemu
  kernel_paths
  ensure_deno
  write_env
  if ((SECONDS - t0 > 1)) || [[ $VERBOSE == 1 ]]; then
    log "ready in $((SECONDS - t0))s: deno $DENO_VERSION, kernel $KERNEL_RELEASE, QEMU $QEMU_VERSION; env: $CACHE/env.sh"
  fi
}

main "$@"
