#!/usr/bin/env bash
# Idempotent from-nothing setup for blksnap-deno.
#
# Installs (or finds, when already present):
#   - host Debian packages needed to build and boot the test VM
#   - deno, pinned, from the npm package `deno`
#   - Debian's 6.12 cloud kernel (vmlinuz + modules), fetched with a private apt
#     configuration so the system's apt sources are left untouched
# and writes $CACHE/env.sh for tools/vm.sh (and humans) to source.
#
# Cache: ${BLKSNAP_CACHE:-$HOME/.cache/blksnap-deno}.  Progress goes to stderr;
# a run with nothing to do prints nothing unless BLKSNAP_VERBOSE=1.
set -euo pipefail

DENO_VERSION=2.9.6
KERNEL_PATTERN='^linux-image-6\.12\.[0-9.+~a-z-]*-cloud-amd64-unsigned$'
HOST_PACKAGES=(
  qemu-system-x86 busybox-static cpio liburing2 e2fsprogs util-linux mount fdisk fio dmsetup
  xz-utils kmod ca-certificates git
)
LISTS_MAX_AGE_S=$((24 * 3600))

CACHE=${BLKSNAP_CACHE:-$HOME/.cache/blksnap-deno}
VERBOSE=${BLKSNAP_VERBOSE:-0}

log() { printf 'setup: %s\n' "$*" >&2; }
vlog() { [[ $VERBOSE == 1 ]] && log "$@" || true; }
die() {
  printf 'setup: ERROR: %s\n' "$*" >&2
  exit 1
}

# Run as root directly, otherwise through sudo (only apt needs it).
as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

# --- host packages ------------------------------------------------------------

pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

ensure_host_packages() {
  local missing=() p
  for p in "${HOST_PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    vlog "host packages: all present"
    return
  fi
  log "installing host packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  local logf=$CACHE/logs/apt-install.log
  mkdir -p "$CACHE/logs"
  { as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    >"$logf" 2>&1 || { tail -n 20 "$logf" >&2; die "apt-get install ${missing[*]} failed (log: $logf)"; }
}

# --- deno -----------------------------------------------------------------------

deno_ok() {
  [[ -x $1 ]] && [[ $("$1" --version 2>/dev/null | head -n1) == "deno $DENO_VERSION "* ]]
}

ensure_deno() {
  local bin=$CACHE/bin/deno
  local npmdir=$CACHE/npm/$DENO_VERSION
  local real=$npmdir/node_modules/@deno/linux-x64-glibc/deno
  if deno_ok "$bin"; then
    vlog "deno $DENO_VERSION: present"
    return
  fi
  [[ $(uname -m) == x86_64 ]] || die "only x86_64 hosts are supported (got $(uname -m))"
  command -v npm >/dev/null || die "npm not found; install Node.js/npm first"
  if ! deno_ok "$real"; then
    log "installing deno $DENO_VERSION from npm"
    rm -rf "$npmdir"
    mkdir -p "$npmdir"
    # The wrapper package's install script only links the platform binary;
    # we use the platform package's binary directly, so skip scripts.
    mkdir -p "$CACHE/logs"
    (cd "$npmdir" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error \
      --prefix "$npmdir" "deno@$DENO_VERSION") >"$CACHE/logs/npm.log" 2>&1 ||
      { tail -n 20 "$CACHE/logs/npm.log" >&2; die "npm install deno@$DENO_VERSION failed"; }
    [[ -f $real ]] || die "deno binary not found at $real after npm install"
    chmod +x "$real"
    deno_ok "$real" || die "$real does not report deno $DENO_VERSION"
  fi
  mkdir -p "$CACHE/bin"
  ln -sfn "$real" "$bin"
}

# --- kernel ---------------------------------------------------------------------

APT_DIR=$CACHE/apt
APT_OPTS=()

init_private_apt() {
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -r $keyring ]] || die "$keyring missing (package debian-archive-keyring)"
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

# Refresh the private package lists if older than a day; 0 = lists usable.
refresh_lists() {
  local stamp=$APT_DIR/lists.stamp now age
  now=$(date +%s)
  if [[ -f $stamp ]]; then
    age=$((now - $(stat -c %Y "$stamp")))
    ((age < LISTS_MAX_AGE_S)) && return 0
  fi
  log "refreshing Debian package lists (bookworm-backports, trixie)"
  if apt-get "${APT_OPTS[@]}" update -qq >"$APT_DIR/update.log" 2>&1 &&
    ! grep -qE '^(W|E): Failed' "$APT_DIR/update.log"; then
    touch "$stamp"
    return 0
  fi
  log "package list refresh failed (see $APT_DIR/update.log)"
  return 1
}

# Print the newest matching kernel as "PACKAGE VERSION".
newest_kernel_pkg() {
  local pkg ver best_pkg='' best_ver=''
  while read -r pkg; do
    ver=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$pkg" 2>/dev/null |
      sed -n 's/^Version: //p' | head -n1)
    [[ -n $ver ]] || continue
    if [[ -z $best_ver ]] || dpkg --compare-versions "$ver" gt "$best_ver"; then
      best_pkg=$pkg best_ver=$ver
    fi
  done < <(apt-cache "${APT_OPTS[@]}" pkgnames linux-image-6.12 | grep -E "$KERNEL_PATTERN" || true)
  [[ -n $best_pkg ]] && echo "$best_pkg $best_ver"
}

# Newest kernel already extracted in the cache (directory name = package version).
newest_cached_kernel() {
  local d
  for d in "$CACHE"/kernel/*/.complete; do
    [[ -e $d ]] && basename "$(dirname "$d")"
  done | sort -V | tail -n1
}

ensure_kernel() {
  init_private_apt
  local pick='' pkg ver dir pickf=$APT_DIR/newest-kernel
  # Querying apt-cache costs seconds, so the answer is remembered until the
  # lists are refreshed (at most daily).
  if refresh_lists && [[ -s $pickf && $pickf -nt $APT_DIR/lists.stamp ]]; then
    pick=$(<"$pickf")
  elif compgen -G "$APT_DIR/lists/*_Packages*" >/dev/null; then
    pick=$(newest_kernel_pkg || true)
    [[ -n $pick ]] && echo "$pick" >"$pickf"
  fi
  if [[ -z $pick ]]; then
    ver=$(newest_cached_kernel)
    [[ -n $ver ]] || die "cannot determine a 6.12 cloud kernel (network down and nothing cached)"
    log "using cached kernel $ver (could not query the registry)"
    KVER_DIR=$CACHE/kernel/$ver
    return
  fi
  read -r pkg ver <<<"$pick"
  dir=$CACHE/kernel/$ver
  if [[ -e $dir/.complete ]]; then
    vlog "kernel $ver: present"
    KVER_DIR=$dir
    return
  fi
  log "downloading $pkg $ver"
  local dl=$APT_DIR/download
  rm -rf "$dl" && mkdir -p "$dl"
  if ! (cd "$dl" && apt-get "${APT_OPTS[@]}" download -qq "$pkg=$ver" >&2); then
    ver=$(newest_cached_kernel)
    [[ -n $ver ]] || die "download of $pkg failed and no kernel is cached"
    log "download failed; using cached kernel $ver"
    KVER_DIR=$CACHE/kernel/$ver
    return
  fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  dpkg-deb -x "$dl"/*.deb "$dir.tmp" || die "dpkg-deb -x failed for $pkg"
  rm -rf "$dl" "$dir"
  mv "$dir.tmp" "$dir"
  touch "$dir/.complete"
  KVER_DIR=$dir
}

# Find vmlinuz and the module tree inside an extracted kernel package.
kernel_paths() {
  local moddir
  KERNEL_VMLINUZ=$(find "$KVER_DIR/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
  [[ -f $KERNEL_VMLINUZ ]] || die "no vmlinuz in $KVER_DIR/boot"
  KERNEL_RELEASE=${KERNEL_VMLINUZ##*/vmlinuz-}
  for moddir in "$KVER_DIR/usr/lib/modules/$KERNEL_RELEASE" "$KVER_DIR/lib/modules/$KERNEL_RELEASE"; do
    [[ -d $moddir ]] && KERNEL_MODDIR=$moddir && break
  done
  [[ -n ${KERNEL_MODDIR:-} ]] || die "no module directory for $KERNEL_RELEASE in $KVER_DIR"
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
EOF
  if cmp -s "$tmp" "$env"; then rm -f "$tmp"; else mv "$tmp" "$env"; fi
}

main() {
  local t0=$SECONDS
  mkdir -p "$CACHE"
  ensure_host_packages
  ensure_deno
  ensure_kernel
  kernel_paths
  write_env
  if ((SECONDS - t0 > 1)) || [[ $VERBOSE == 1 ]]; then
    log "ready in $((SECONDS - t0))s: deno $DENO_VERSION, kernel $KERNEL_RELEASE; env in $CACHE/env.sh"
  fi
}

main "$@"
