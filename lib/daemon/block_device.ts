/**
 * Looking at block devices by path: existence, kind, device number, geometry.
 */
import { BlksnapError, ErrnoError } from "../../ffi/errno.ts";
import { BLK, type Libc, O } from "../../ffi/libc.ts";
import type { DeviceParams } from "../ublk/control.ts";
import { decodeDevT, deviceKey, type DeviceNumber, parseDeviceKey } from "../dev_t.ts";
import { assert } from "../assert.ts";

export interface BlockDeviceId extends DeviceNumber {
  /** The path as given. */
  path: string;
  /** "MAJ:MIN" */
  key: string;
}

export interface Geometry {
  sizeBytes: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  discardMaxBytes: number;
  discardGranularity: number;
  rotational: boolean;
}

/** The id of a device known by path and "MAJ:MIN" (e.g. a tracked device's). */
export function blockDeviceId(path: string, key: string): BlockDeviceId {
  const n = parseDeviceKey(key);
  assert(n !== undefined, "a device key that is not MAJ:MIN");
  return { path, ...n, key };
}

/** Stats `path` and requires a block device; errors name the path and the reason. */
export function identifyBlockDevice(path: string, verb: string): BlockDeviceId {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      const byNumber = viaSysfs(path);
      if (byNumber) return byNumber;
      throw new BlksnapError("ENOENT", `Cannot ${verb} "${path}": no such file or directory`);
    }
    if (err instanceof Deno.errors.PermissionDenied) {
      throw new BlksnapError("EACCES", `Cannot ${verb} "${path}": permission denied`);
    }
    throw new BlksnapError("EINVAL", `Cannot ${verb} "${path}": ${(err as Error).message}`);
  }
  if (!info.isBlockDevice) {
    const kind = info.isFile
      ? "a regular file"
      : info.isDirectory
      ? "a directory"
      : "a special file";
    throw new BlksnapError(
      "ENOTBLK",
      `Cannot ${verb} "${path}": it is ${kind}, not a block device`,
    );
  }
  // Deno's rdev is glibc's 64-bit dev_t.
  const n = decodeDevT(info.rdev ?? 0);
  return { path, ...n, key: deviceKey(n) };
}

/**
 * `/dev/block/MAJ:MIN` without the link (no udev: devices made after boot in
 * a minimal system) names the device through sysfs: its node is /dev/DEVNAME.
 */
function viaSysfs(path: string): BlockDeviceId | undefined {
  if (!path.startsWith("/dev/block/")) return undefined;
  const n = parseDeviceKey(path.slice("/dev/block/".length));
  if (!n) return undefined;
  try {
    const uevent = Deno.readTextFileSync(`/sys/dev/block/${n.major}:${n.minor}/uevent`);
    const name = /^DEVNAME=(.+)$/m.exec(uevent)?.[1];
    if (!name || !Deno.statSync(`/dev/${name}`).isBlockDevice) return undefined;
    return { path: `/dev/${name}`, ...n, key: deviceKey(n) };
  } catch {
    return undefined;
  }
}

function readSysfsNumber(n: DeviceNumber, attr: string): number {
  try {
    return Number(Deno.readTextFileSync(`/sys/dev/block/${n.major}:${n.minor}/${attr}`).trim());
  } catch {
    return 0;
  }
}

/** Size and block sizes through ioctls on an open fd; discard limits from sysfs. */
export function readGeometry(libc: Libc, fd: number, n: DeviceNumber): Geometry {
  const size = libc.ioctlGetU64(fd, BLK.BLKGETSIZE64, "ioctl(BLKGETSIZE64)");
  return {
    sizeBytes: Number(size),
    logicalBlockSize: libc.ioctlGetU32(fd, BLK.BLKSSZGET, "ioctl(BLKSSZGET)"),
    physicalBlockSize: libc.ioctlGetU32(fd, BLK.BLKPBSZGET, "ioctl(BLKPBSZGET)"),
    discardMaxBytes: readSysfsNumber(n, "queue/discard_max_bytes"),
    discardGranularity: readSysfsNumber(n, "queue/discard_granularity"),
    rotational: readSysfsNumber(n, "queue/rotational") === 1,
  };
}

/**
 * Opens a block device exclusively (O_EXCL: the kernel refuses while it is
 * mounted or claimed) and with O_DIRECT, read-write unless `readOnly`. EBUSY
 * becomes a message an administrator can act on.
 */
export function openExclusive(
  libc: Libc,
  id: BlockDeviceId,
  verb: string,
  options: { readOnly?: boolean } = {},
): number {
  const access = options.readOnly ? O.RDONLY : O.RDWR;
  try {
    return libc.open(id.path, access | O.EXCL | O.DIRECT | O.CLOEXEC);
  } catch (err) {
    if (err instanceof ErrnoError && err.code === "EBUSY") {
      throw new BlksnapError(
        "EBUSY",
        `Cannot ${verb} "${id.path}": the device is in use (mounted, or held open exclusively${
          holdersOf(id)
        })`,
      );
    }
    if (err instanceof ErrnoError) {
      throw BlksnapError.fromErrno(err, `Cannot ${verb} "${id.path}": ${err.message}`);
    }
    throw err;
  }
}

/**
 * Opens an original to be tracked, exclusively: read-write, or read-only when
 * the device is read-only (`losetup -r`, `blockdev --setro`, a write-protected
 * disk: its sysfs `ro` attribute or BLKROGET says 1, or a write open fails with
 * EROFS). A read-only original gets a read-only tracked device.
 */
export function openOriginal(
  libc: Libc,
  id: BlockDeviceId,
  verb: string,
): { fd: number; readOnly: boolean } {
  if (readSysfsNumber(id, "ro") === 1) {
    return { fd: openExclusive(libc, id, verb, { readOnly: true }), readOnly: true };
  }
  let fd: number;
  try {
    fd = openExclusive(libc, id, verb);
  } catch (err) {
    // Some drivers refuse a write open of read-only media outright.
    if (!(err instanceof BlksnapError && err.code === "EROFS")) throw err;
    return { fd: openExclusive(libc, id, verb, { readOnly: true }), readOnly: true };
  }
  let readOnly: boolean;
  try {
    readOnly = libc.ioctlGetU32(fd, BLK.BLKROGET, "ioctl(BLKROGET)") !== 0;
  } catch (err) {
    libc.close(fd);
    throw err;
  }
  if (!readOnly) return { fd, readOnly };
  // Made read-only between the sysfs read and the open: reopen without write access.
  libc.close(fd);
  return { fd: openExclusive(libc, id, verb, { readOnly: true }), readOnly: true };
}

/** ", e.g. by dm-0" from sysfs holders, or "" when none are listed. */
function holdersOf(n: DeviceNumber): string {
  try {
    const names = [...Deno.readDirSync(`/sys/dev/block/${n.major}:${n.minor}/holders`)].map((e) =>
      e.name
    );
    return names.length > 0 ? ` by ${names.join(", ")}` : "";
  } catch {
    return "";
  }
}

/**
 * ublk parameters for a device that mirrors `geo`: its size and sector sizes,
 * I/O size limits from the per-tag buffer, and discard when the original
 * has it (a tracked device) — an image passes no discard geometry. A
 * read-only device (UBLK_ATTR_READ_ONLY) advertises neither a write cache nor
 * discard: nothing is written through it.
 */
export function ublkParams(
  geo: Pick<Geometry, "sizeBytes" | "logicalBlockSize" | "physicalBlockSize"> & {
    discardMaxBytes?: number;
    discardGranularity?: number;
  },
  maxIoBufBytes: number,
  options: { writeCache: boolean; readOnly?: boolean },
): DeviceParams {
  const readOnly = options.readOnly ?? false;
  const logicalBsShift = Math.log2(geo.logicalBlockSize);
  const physicalBsShift = Math.max(
    logicalBsShift,
    Math.min(Math.log2(geo.physicalBlockSize || 512), 12),
  );
  const maxDiscard = readOnly
    ? 0
    : Math.min(Math.floor((geo.discardMaxBytes ?? 0) / 512), 2_097_152);
  return {
    devSectors: geo.sizeBytes / 512,
    logicalBsShift,
    physicalBsShift,
    ioMinShift: physicalBsShift,
    ioOptShift: physicalBsShift,
    maxSectors: maxIoBufBytes / 512,
    readOnly,
    writeCache: options.writeCache && !readOnly,
    ...(maxDiscard > 0
      ? {
        discard: {
          granularityBytes: Math.max(geo.discardGranularity ?? 0, geo.logicalBlockSize),
          maxDiscardSectors: maxDiscard,
          maxWriteZeroesSectors: maxDiscard,
        },
      }
      : {}),
  };
}
