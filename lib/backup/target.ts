/**
 * Restore targets that are block devices: refused when mounted (by MAJ:MIN
 * in /proc/self/mountinfo) or held by someone else (an O_EXCL open fails:
 * a mounted filesystem, the blksnap daemon holding a tracked original, LVM,
 * md...). The exclusive descriptor is kept for the whole restore, so nobody
 * mounts the device meanwhile; the data goes through an ordinary descriptor.
 *
 * Only this module of lib/backup/ calls libc (Deno cannot open O_EXCL).
 *
 * @module
 */
import { BlksnapError } from "../engine/errors.ts";
import { devTKey } from "../dev_t.ts";
import { FALLOC_FL, type Libc, O, openLibc } from "../../ffi/libc.ts";
import { ErrnoError } from "../../ffi/errno.ts";
import { openFileTarget, type RestoreTarget, writeAt, writeZeroes } from "./chain.ts";

/** MAJ:MIN -> mount points, from mountinfo text (field 3 is MAJ:MIN, field 5 the mount point). */
export function mountsByDevice(mountinfo: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of mountinfo.split("\n")) {
    const f = line.split(" ");
    if (f.length < 5 || !/^\d+:\d+$/.test(f[2]!)) continue;
    const list = out.get(f[2]!) ?? [];
    list.push(f[4]!.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8))));
    out.set(f[2]!, list);
  }
  return out;
}

/**
 * Clears ranges with fallocate(`mode`) on descriptor `fd` (the kernel
 * zeroes or unmaps them: WRITE_ZEROES, or zero pages it writes itself, on a
 * device; a hole in a file). Where fallocate is refused (a filesystem
 * without holes, a range the device's block size does not divide), zeroes
 * are written with `write` in 4 MiB runs from then on.
 */
function zeroer(
  libc: Libc,
  fd: number,
  mode: number,
  write: (offset: number, data: Uint8Array) => Promise<void>,
): (offset: number, length: number) => Promise<void> {
  let refused = false;
  return (offset, length) => {
    if (!refused) {
      if (libc.sym.fallocate(fd, mode, BigInt(offset), BigInt(length)) === 0) {
        return Promise.resolve();
      }
      refused = true;
    }
    return writeZeroes(write, offset, length);
  };
}

/** Opens a restore target: a block device (checked as above) or a regular file. */
export function openTarget(path: string, sizeBytes: number): RestoreTarget {
  let info: Deno.FileInfo | null = null;
  try {
    info = Deno.statSync(path);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  if (info === null || !info.isBlockDevice) {
    const target = openFileTarget(path, sizeBytes);
    if (target.fresh) return target; // zero clusters are holes already
    // An existing file: zero clusters become holes (PUNCH_HOLE keeps the size).
    return withZeroer(target, path, FALLOC_FL.PUNCH_HOLE | FALLOC_FL.KEEP_SIZE);
  }
  const key = devTKey(info.rdev ?? 0);
  const mounts = mountsByDevice(Deno.readTextFileSync("/proc/self/mountinfo")).get(key);
  if (mounts !== undefined) {
    throw new BlksnapError(
      "EBUSY",
      `The target ${path} (${key}) is mounted at ${mounts.join(", ")}: unmount it first`,
    );
  }
  const libc = openLibc();
  let fd: number;
  try {
    fd = libc.open(path, O.RDONLY | O.EXCL | O.CLOEXEC);
  } catch (err) {
    libc.unload();
    if (err instanceof ErrnoError && err.code === "EBUSY") {
      throw new BlksnapError(
        "EBUSY",
        `The target ${path} is in use (held open exclusively: a tracked original, which the ` +
          `blksnap daemon holds, a device-mapper or md member, or a mounted filesystem): ` +
          `restore to a device nobody uses`,
      );
    }
    throw new BlksnapError("EIO", `Cannot open the target ${path}: ${(err as Error).message}`);
  }
  let file: Deno.FsFile;
  let wfd = -1;
  try {
    file = Deno.openSync(path, { write: true });
  } catch (err) {
    libc.close(fd);
    libc.unload();
    throw new BlksnapError("EIO", `Cannot open the target ${path}: ${(err as Error).message}`);
  }
  try {
    wfd = libc.open(path, O.WRONLY | O.CLOEXEC);
  } catch (err) {
    file.close();
    libc.close(fd);
    libc.unload();
    throw new BlksnapError("EIO", `Cannot open the target ${path}: ${(err as Error).message}`);
  }
  const deviceBytes = file.seekSync(0, Deno.SeekMode.End);
  let closed = false;
  return {
    path,
    sizeBytes: deviceBytes,
    fresh: false,
    write: (offset, data) => writeAt(file, offset, data),
    // ZERO_RANGE on a block device: blkdev_issue_zeroout (WRITE_ZEROES, or
    // zero pages the kernel writes), the page cache of the range dropped.
    zero: zeroer(
      libc,
      wfd,
      FALLOC_FL.ZERO_RANGE | FALLOC_FL.KEEP_SIZE,
      (offset, data) => writeAt(file, offset, data),
    ),
    commit() {
      file.syncSync();
    },
    close() {
      if (closed) return;
      closed = true;
      file.close();
      libc.close(wfd);
      libc.close(fd);
      libc.unload();
    },
  };
}

/**
 * `target` (an existing file), its zero() done by fallocate(`mode`) where
 * the filesystem can. libc is opened at the first zero(); without it (no FFI
 * permission) the file's own zero() writes zeroes.
 */
function withZeroer(target: RestoreTarget, path: string, mode: number): RestoreTarget {
  let libc: Libc | null = null;
  let fd = -1;
  let zero: ((offset: number, length: number) => Promise<void>) | null = null;
  return {
    path: target.path,
    sizeBytes: target.sizeBytes,
    fresh: target.fresh,
    write: (offset, data) => target.write(offset, data),
    zero(offset, length) {
      if (zero === null) {
        try {
          libc = openLibc();
          fd = libc.open(path, O.WRONLY | O.CLOEXEC);
          zero = zeroer(libc, fd, mode, (o, d) => target.write(o, d));
        } catch {
          libc?.unload();
          libc = null;
          zero = (o, l) => target.zero(o, l);
        }
      }
      return zero(offset, length);
    },
    commit: () => target.commit(),
    close() {
      target.close();
      if (libc !== null) {
        if (fd >= 0) libc.close(fd);
        fd = -1;
        libc.unload();
        libc = null;
      }
    },
  };
}
