/**
 * Freezing the filesystems mounted from tracked devices around a take
 * (FIFREEZE / FITHAW), so that each snapshot image shows a clean
 * filesystem. The daemon runs in a private mount namespace; the system's
 * mounts are those of PID 1, reached through /proc/1.
 */
import { FS_IOC, type Libc, O } from "../../ffi/libc.ts";

export interface Frozen {
  fd: number;
  device: string;
  mountPoint: string;
}

/** The mount points of each "MAJ:MIN" in `/proc/PID/mountinfo` (first mount of each device). */
export function findMounts(devices: readonly string[], pid = 1): Map<string, string> {
  const wanted = new Set(devices);
  const out = new Map<string, string>();
  let text: string;
  try {
    text = Deno.readTextFileSync(`/proc/${pid}/mountinfo`);
  } catch {
    return out;
  }
  for (const line of text.split("\n")) {
    const fields = line.split(" ");
    const dev = fields[2];
    const mountPoint = fields[4];
    if (dev === undefined || mountPoint === undefined || !wanted.has(dev) || out.has(dev)) continue;
    out.set(dev, unescapeMountPath(mountPoint));
  }
  return out;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
export function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/**
 * Freezes the filesystems mounted from `devices`. A filesystem that cannot be
 * frozen is reported through `warn` and left alone, as the module does: the
 * take goes on, and the image shows it as after a crash.
 */
export function freezeAll(
  libc: Libc,
  devices: readonly string[],
  warn: (message: string) => void,
): Frozen[] {
  const frozen: Frozen[] = [];
  for (const [device, mountPoint] of findMounts(devices)) {
    let fd = -1;
    try {
      fd = libc.open(`/proc/1/root${mountPoint}`, O.RDONLY | O.CLOEXEC);
      libc.check(libc.sym.ioctl(fd, FS_IOC.FIFREEZE, null), `ioctl(FIFREEZE, "${mountPoint}")`);
      frozen.push({ fd, device, mountPoint });
    } catch (err) {
      warn(`cannot freeze ${mountPoint} (${device}): ${err instanceof Error ? err.message : err}`);
      if (fd >= 0) libc.close(fd);
    }
  }
  return frozen;
}

/** Thaws what `freezeAll` froze (also after a failed take). */
export function thawAll(libc: Libc, frozen: Frozen[], warn: (message: string) => void): void {
  for (const f of frozen) {
    if (libc.sym.ioctl(f.fd, FS_IOC.FITHAW, null) < 0) {
      warn(`cannot thaw ${f.mountPoint} (${f.device}): errno ${libc.errno()}`);
    }
    libc.close(f.fd);
  }
}

/**
 * FITHAW of the filesystem mounted at `mountPoint` (as PID 1 sees it): true
 * when it was frozen and is thawed now, false when it was not frozen (EINVAL)
 * or cannot be reached.
 */
export function thawMountPoint(libc: Libc, mountPoint: string): boolean {
  let fd = -1;
  try {
    fd = libc.open(`/proc/1/root${mountPoint}`, O.RDONLY | O.CLOEXEC);
    return libc.sym.ioctl(fd, FS_IOC.FITHAW, null) === 0;
  } catch {
    return false;
  } finally {
    if (fd >= 0) libc.close(fd);
  }
}
