#!/usr/bin/env bash
# Build (or reuse) the BASE initramfs for the test VM and print its path.
#
# The base is an uncompressed newc cpio (the guest kernel unpacks it much faster
# under TCG than it would decompress it) holding busybox, deno and its
# libraries, liburing, e2fsprogs, util-linux tools, fio, dmsetup, qemu-img and
# qemu-nbd (the backup tests check our qcow2 files with them), dash (as
# /bin/sh) and bash, the kernel modules the tests need (decompressed, with their
# dependencies, load order in /etc/blksnap/modules), /init and the uevent
# helper, and /usr/local/bin/ublk-ref: the minimal C ublk passthrough server
# (../shared/tools/ublk-ref/ublk-ref.c, the benchmark's yardstick) built here
# with gcc, liburing linked statically when liburing.a is there (without gcc,
# liburing-dev or the source the base is built without it, with a warning).
# The project tree and the command to run are NOT in it: tools/vm.sh appends a
# small per-run cpio for those.
#
# It is cached under $BLKSNAP_CACHE/initramfs/ keyed by a hash of everything
# that goes in (kernel, deno, host package versions, this script, init,
# hotplug), so it is rebuilt only when one of those changes.
#
# Needs the variables from $BLKSNAP_CACHE/env.sh (written by tools/setup.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
UBLK_REF_SRC=${BLKSNAP_UBLK_REF_SRC:-$ROOT/../shared/tools/ublk-ref/ublk-ref.c}
: "${BLKSNAP_CACHE:?source env.sh first}" "${DENO:?}" "${KERNEL_MODDIR:?}" "${KERNEL_RELEASE:?}"

# Kernel modules to load at boot (dependencies are added automatically).
MODULES=(ublk_drv loop dm-mod dm-bufio dm-snapshot nbd)
# Host programs copied in with their shared libraries; these take precedence
# over busybox applets of the same name.
PROGRAMS=(
  fio
  mke2fs mkfs.ext4 e2fsck fsck.ext4 tune2fs dumpe2fs debugfs resize2fs
  losetup blockdev mount umount lsblk findmnt fsfreeze blkid unshare wipefs
  fallocate sfdisk nsenter
  dmsetup
  dd
  qemu-img qemu-nbd
  dash bash
)
# Host packages whose version is part of the cache key.
KEY_PACKAGES=(busybox-static fio e2fsprogs util-linux mount fdisk dmsetup liburing2 libc6 coreutils dash bash
  gcc liburing-dev libc6-dev qemu-utils)
LIBURING=/usr/lib/x86_64-linux-gnu/liburing.so.2

log() { printf 'vm: %s\n' "$*" >&2; }
die() {
  printf 'vm: ERROR: %s\n' "$*" >&2
  exit 1
}

cache_key() {
  {
    echo "kernel $KERNEL_RELEASE ${KERNEL_PKG_VERSION:-}"
    echo "deno $("$DENO" --version | head -n1)"
    dpkg-query -W "${KEY_PACKAGES[@]}" 2>/dev/null || true
    echo "modules ${MODULES[*]}"
    sha256sum "$HERE/build-base.sh" "$HERE/init" "$HERE/hotplug" | cut -d' ' -f1
    if [[ -f $UBLK_REF_SRC ]]; then sha256sum <"$UBLK_REF_SRC" | cut -d' ' -f1; else echo "no ublk-ref"; fi
  } | sha256sum | cut -c1-16
}

# Copy a file to the same absolute path under $STAGE (following symlinks).
# $STAGE has merged-/usr symlinks, so /lib/... lands in /usr/lib/...
stage_file() {
  local src=$1 dst=$STAGE${2:-$1}
  [[ -e $dst ]] && return
  mkdir -p "$(dirname "$dst")"
  cp -L "$src" "$dst"
}

# Copy a binary plus every shared library ldd reports for it.
stage_binary() {
  local bin=$1 dst=${2:-$1} lib
  stage_file "$bin" "$dst"
  while read -r lib; do
    stage_file "$lib"
  done < <(ldd "$bin" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }')
}

find_program() {
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin command -v "$1" ||
    die "host program '$1' not found (run tools/setup.sh)"
}

# Module file for a module name ('-' and '_' are interchangeable in names).
module_file() {
  local name=$1 f
  f=$(find "$KERNEL_MODDIR/kernel" \( -name "$name.ko*" -o -name "${name//-/_}.ko*" \
    -o -name "${name//_/-}.ko*" \) -print -quit)
  echo "$f"
}

module_builtin() {
  local name=$1
  grep -qE "/(${name//[-_]/[-_]})\.ko\$" "$KERNEL_MODDIR/modules.builtin" 2>/dev/null
}

# Depth-first: dependencies are appended to ORDER before the module itself.
declare -A SEEN=()
ORDER=()
resolve_module() {
  local name=$1 f dep deps
  [[ -n ${SEEN[$name]:-} ]] && return
  SEEN[$name]=1
  if module_builtin "$name"; then
    log "module $name is built into the kernel"
    return
  fi
  f=$(module_file "$name")
  [[ -n $f ]] || die "module $name not found under $KERNEL_MODDIR"
  deps=$(modinfo -F depends "$f") || die "modinfo failed on $f"
  for dep in ${deps//,/ }; do resolve_module "$dep"; done
  ORDER+=("$name:$f")
}

stage_modules() {
  local m name f dst=$STAGE/usr/lib/modules/$KERNEL_RELEASE
  mkdir -p "$dst"
  for m in "${MODULES[@]}"; do resolve_module "$m"; done
  : >"$STAGE/etc/blksnap/modules"
  for m in "${ORDER[@]}"; do
    name=${m%%:*} f=${m#*:}
    # busybox insmod cannot read .ko.xz: store them decompressed.
    case $f in
      *.xz) xz -dc "$f" >"$dst/$name.ko" ;;
      *.zst) zstd -dcq "$f" >"$dst/$name.ko" ;;
      *) cp "$f" "$dst/$name.ko" ;;
    esac
    echo "$name" >>"$STAGE/etc/blksnap/modules"
  done
}

# The C reference ublk server, for the benchmark; optional (a warning when it cannot be built).
stage_ublk_ref() {
  local dst=$STAGE/usr/local/bin/ublk-ref uring=(-luring) a=/usr/lib/x86_64-linux-gnu/liburing.a
  if [[ ! -f $UBLK_REF_SRC ]]; then
    log "warning: $UBLK_REF_SRC not found; the VM has no ublk-ref"
    return 0
  fi
  if ! command -v gcc >/dev/null; then
    log "warning: no gcc; the VM has no ublk-ref (apt-get install gcc liburing-dev)"
    return 0
  fi
  # Static liburing: the guest then needs only libc, whatever liburing.so it has.
  [[ -f $a ]] && uring=(-Wl,-Bstatic -luring -Wl,-Bdynamic)
  if gcc -O2 -w -o "$dst" "$UBLK_REF_SRC" "${uring[@]}" -lpthread 2>"$STAGE/ublk-ref.log"; then
    stage_binary "$dst" /usr/local/bin/ublk-ref
  else
    log "warning: building ublk-ref failed (apt-get install gcc liburing-dev?):"
    sed 's/^/  | /' "$STAGE/ublk-ref.log" | head -n 20 >&2
    rm -f "$dst"
  fi
  rm -f "$STAGE/ublk-ref.log"
}

stage_busybox() {
  local applet
  stage_file /bin/busybox /usr/bin/busybox
  # Applet symlinks, without shadowing the real programs staged above.
  while read -r applet; do
    [[ -e $STAGE/$applet || -L $STAGE/$applet ]] && continue
    [[ -e $STAGE/usr/bin/${applet##*/} || -e $STAGE/usr/sbin/${applet##*/} ]] && continue
    mkdir -p "$STAGE/$(dirname "$applet")"
    ln -s /usr/bin/busybox "$STAGE/$applet"
  done < <(/bin/busybox --list-full | grep -v '^linuxrc$')
}

stage_etc() {
  local e=$STAGE/etc
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$e/passwd"
  printf 'root:x:0:\ndisk:x:6:\nnogroup:x:65534:\n' >"$e/group"
  printf 'passwd: files\ngroup: files\nhosts: files\n' >"$e/nsswitch.conf"
  printf '127.0.0.1 localhost blksnap-vm\n::1 localhost\n' >"$e/hosts"
  echo blksnap-vm >"$e/hostname"
  : >"$e/fstab"
  ln -s /proc/self/mounts "$e/mtab"
  cp /etc/mke2fs.conf "$e/mke2fs.conf"
  printf '/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n' >"$e/ld.so.conf"
  # A cache so dlopen("liburing.so.2") and friends resolve like on the host.
  ldconfig -r "$STAGE" 2>/dev/null || log "warning: ldconfig -r failed; relying on default paths"
}

build() {
  local out=$1 t0=$EPOCHREALTIME p bin
  STAGE=$(mktemp -d "$BLKSNAP_CACHE/initramfs/stage.XXXXXX")
  trap 'rm -rf "$STAGE"' EXIT
  # Merged-/usr layout like Debian bookworm, so ldd paths resolve unchanged.
  mkdir -p "$STAGE"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,usr/local/bin} \
    "$STAGE"/{etc/blksnap,proc,sys,dev,tmp,run,root,mnt,out,blksnap,var}
  ln -s usr/bin "$STAGE/bin"
  ln -s usr/sbin "$STAGE/sbin"
  ln -s usr/lib "$STAGE/lib"
  ln -s usr/lib64 "$STAGE/lib64"
  ln -s /tmp "$STAGE/var/tmp"
  chmod 1777 "$STAGE/tmp"

  stage_binary "$(readlink -f "$DENO")" /usr/local/bin/deno
  for p in "${PROGRAMS[@]}"; do
    bin=$(find_program "$p")
    stage_binary "$bin"
  done
  [[ -e $LIBURING ]] || die "$LIBURING missing (package liburing2)"
  stage_file "$(readlink -f "$LIBURING")"
  ln -sfn "$(basename "$(readlink -f "$LIBURING")")" "$STAGE$LIBURING"
  # /bin/sh must not be busybox: Debian's busybox sh prefers its own applets
  # over $PATH, so `sh -c "losetup --show ..."` would get busybox's losetup.
  ln -s dash "$STAGE/usr/bin/sh"
  stage_ublk_ref
  stage_busybox
  stage_etc
  stage_modules
  install -m 0755 "$HERE/init" "$STAGE/init"
  install -D -m 0755 "$HERE/hotplug" "$STAGE/usr/lib/blksnap/hotplug"

  (cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) >"$out.tmp"
  mv "$out.tmp" "$out"
  log "built base initramfs in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s:" \
    "$(du -m "$out" | cut -f1) MiB, modules: $(tr '\n' ' ' <"$STAGE/etc/blksnap/modules")"
}

main() {
  local dir=$BLKSNAP_CACHE/initramfs key out
  mkdir -p "$dir"
  key=$(cache_key)
  out=$dir/base-$key.cpio
  if [[ ! -s $out ]]; then
    # Serialise concurrent builders; the second one finds the result.
    exec 9>"$dir/.lock"
    flock 9
    if [[ ! -s $out ]]; then
      log "building base initramfs ($key)"
      (build "$out")
      find "$dir" -maxdepth 1 -name 'base-*.cpio' ! -name "base-$key.cpio" -delete
    fi
  fi
  echo "$out"
}

main "$@"
