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
import { O, openLibc } from "../../ffi/libc.ts";
import { ErrnoError } from "../../ffi/errno.ts";
import { openFileTarget, type RestoreTarget } from "./chain.ts";

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

/** Opens a restore target: a block device (checked as above) or a regular file. */
export function openTarget(path: string, sizeBytes: number): RestoreTarget {
  let info: Deno.FileInfo | null = null;
  try {
    info = Deno.statSync(path);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  if (info === null || !info.isBlockDevice) return openFileTarget(path, sizeBytes);
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
  try {
    file = Deno.openSync(path, { write: true });
  } catch (err) {
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
    write(offset, data) {
      file.seekSync(offset, Deno.SeekMode.Start);
      let done = 0;
      while (done < data.length) done += file.writeSync(data.subarray(done));
    },
    commit() {
      file.syncSync();
    },
    close() {
      if (closed) return;
      closed = true;
      file.close();
      libc.close(fd);
      libc.unload();
    },
  };
}
