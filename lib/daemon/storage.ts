/**
 * Opening a snapshot's difference storage: a regular file (locked
 * exclusively), a directory (an unnamed O_TMPFILE file in it, gone with the
 * snapshot) or a block device (O_EXCL). The daemon lives in a private mount
 * namespace, so a path is looked up in the requesting client's: through
 * /proc/PID/root.
 */
import { BlksnapError, ErrnoError } from "../../ffi/errno.ts";
import { BLK, F, type Libc, LOCK, O } from "../../ffi/libc.ts";
import { devTKey } from "../dev_t.ts";
import { STORAGE_KIND } from "../pipeline/storage_ctl.ts";

export interface OpenStorage {
  fd: number;
  /** The path as the user gave it. */
  path: string;
  kind: number;
  /** "MAJ:MIN" of the device that holds the storage: it cannot be in the snapshot. */
  deviceKey: string;
  /** Current size in bytes (0 for a new unnamed file). */
  sizeBytes: number;
}

/** The path to open for `path` as the client `pid` sees it (the path itself without a pid). */
export function clientPath(path: string, pid: number | undefined): string {
  if (pid === undefined || pid === Deno.pid) return path;
  const viaProc = `/proc/${pid}/root${path}`;
  try {
    Deno.statSync(`/proc/${pid}/root`);
    return viaProc;
  } catch {
    return path; // the client is gone, or no procfs: our own view is all there is
  }
}

export function openStorage(libc: Libc, path: string, pid: number | undefined): OpenStorage {
  const where = clientPath(path, pid);
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(where);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new BlksnapError("ENOENT", `The difference storage "${path}" does not exist`);
    }
    throw new BlksnapError("EACCES", `Cannot use "${path}": ${(err as Error).message}`);
  }
  const fail = (err: unknown, what: string): never => {
    if (!(err instanceof ErrnoError)) throw err;
    if (err.code === "EBUSY" || err.code === "EWOULDBLOCK" || err.code === "EAGAIN") {
      throw new BlksnapError(
        "EBUSY",
        `Cannot ${what} the difference storage "${path}": it is in use`,
      );
    }
    throw BlksnapError.fromErrno(
      err,
      `Cannot ${what} the difference storage "${path}": ${err.message}`,
    );
  };
  if (info.isBlockDevice) {
    let fd = -1;
    try {
      fd = libc.open(where, O.RDWR | O.EXCL | O.CLOEXEC);
      const size = Number(libc.ioctlGetU64(fd, BLK.BLKGETSIZE64, "ioctl(BLKGETSIZE64)"));
      return {
        fd,
        path,
        kind: STORAGE_KIND.BLOCKDEV,
        deviceKey: devTKey(info.rdev ?? 0),
        sizeBytes: size,
      };
    } catch (err) {
      if (fd >= 0) libc.close(fd);
      return fail(err, "open");
    }
  }
  if (info.isDirectory) {
    try {
      const fd = libc.open(where, O.TMPFILE | O.RDWR | O.EXCL | O.CLOEXEC, 0o600);
      return {
        fd,
        path,
        kind: STORAGE_KIND.TMPFILE,
        deviceKey: devTKey(info.dev),
        sizeBytes: 0,
      };
    } catch (err) {
      if (err instanceof ErrnoError && err.code === "EOPNOTSUPP") {
        throw new BlksnapError(
          "EOPNOTSUPP",
          `Cannot make an unnamed file in "${path}": its filesystem has no O_TMPFILE; give a file instead`,
        );
      }
      return fail(err, "make");
    }
  }
  if (info.isFile) {
    let fd = -1;
    try {
      fd = libc.open(where, O.RDWR | O.CLOEXEC);
      libc.check(libc.sym.flock(fd, LOCK.EX | LOCK.NB), `flock("${path}")`);
      return {
        fd,
        path,
        kind: STORAGE_KIND.FILE,
        deviceKey: devTKey(info.dev),
        sizeBytes: info.size,
      };
    } catch (err) {
      if (fd >= 0) libc.close(fd);
      return fail(err, "open");
    }
  }
  throw new BlksnapError(
    "EINVAL",
    `The difference storage "${path}" must be a regular file, a directory or a block device`,
  );
}

/** What a device of the snapshot asks of the storage's alignment. */
export interface DirectIoDevice {
  path: string;
  logicalBlockSize: number;
  chunkBytes: number;
}

/**
 * Why the snapshot's I/O to a block-device storage cannot be direct, or null
 * when it can. O_DIRECT needs every request aligned to the storage's logical
 * block size (`storageBlock`): the store writes whole chunks at extent starts
 * (multiples of `unitBytes`; a device's last chunk ends at its size, a
 * multiple of its logical block size), an image request is aligned to its
 * device's logical block size, and every buffer is page aligned. So the
 * storage's block must divide the unit, each device's logical block and each
 * chunk.
 */
export function directIoRefusal(
  storageBlock: number,
  unitBytes: number,
  devices: DirectIoDevice[],
): string | null {
  if (!(storageBlock >= 512 && (storageBlock & (storageBlock - 1)) === 0)) {
    return `its logical block size ${storageBlock} is not a power of two of at least 512`;
  }
  if (unitBytes % storageBlock !== 0) {
    return `its logical block size ${storageBlock} is larger than the allocation unit ${unitBytes}`;
  }
  for (const d of devices) {
    if (d.logicalBlockSize % storageBlock !== 0 || d.chunkBytes % storageBlock !== 0) {
      return `its logical block size ${storageBlock} is larger than ${d.path}'s (${d.logicalBlockSize})`;
    }
  }
  return null;
}

/**
 * Sets or clears O_DIRECT on the storage's open file (shared by the store
 * worker and the image queues: the flag is the file's, read at each request).
 */
export function setDirectIo(libc: Libc, fd: number, direct: boolean): void {
  const flags = libc.check(libc.sym.fcntl(fd, F.GETFL, 0n), "fcntl(F_GETFL)");
  const next = direct ? flags | O.DIRECT : flags & ~O.DIRECT;
  if (next !== flags) libc.check(libc.sym.fcntl(fd, F.SETFL, BigInt(next)), "fcntl(F_SETFL)");
}

/** The logical block size of a block-device storage. */
export function storageBlockSize(libc: Libc, fd: number): number {
  return libc.ioctlGetU32(fd, BLK.BLKSSZGET, "ioctl(BLKSSZGET)");
}
