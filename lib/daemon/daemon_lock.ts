/**
 * One daemon per socket: an exclusive flock(2) on the lock file beside the
 * socket (`/run/blksnap/control.lock`), taken before anything else and held
 * for the daemon's life. The kernel drops it when the daemon dies, however it
 * dies, so a lock never goes stale. Two daemons started at the same moment
 * (two CLIs that each found no daemon) race for the lock, not for the socket
 * path: exactly one wins; the other exits, and its CLI waits for the winner.
 */
import { BlksnapError } from "../engine/errors.ts";

export class DaemonLock {
  readonly path: string;
  #file: Deno.FsFile | null;

  private constructor(path: string, file: Deno.FsFile) {
    this.path = path;
    this.#file = file;
  }

  /** Takes the lock, or fails at once with EBUSY naming the holder. */
  static acquire(path: string): DaemonLock {
    const file = Deno.openSync(path, { read: true, write: true, create: true, mode: 0o600 });
    let locked = false;
    try {
      locked = file.tryLockSync(true);
    } catch (err) {
      file.close();
      throw new BlksnapError(
        "EIO",
        `Cannot lock "${path}": ${err instanceof Error ? err.message : err}`,
      );
    }
    if (!locked) {
      file.close();
      const holder = readHolder(path);
      throw new BlksnapError(
        "EBUSY",
        `Another blksnap daemon${holder ? ` (pid ${holder})` : ""} holds "${path}"`,
      );
    }
    // The holder's pid, for messages only: the lock, not the content, decides.
    file.truncateSync(0);
    file.writeSync(new TextEncoder().encode(`${Deno.pid}\n`));
    return new DaemonLock(path, file);
  }

  /** Whether some process holds the lock at this moment (false when there is no file). */
  static isHeld(path: string): boolean {
    let file: Deno.FsFile;
    try {
      file = Deno.openSync(path, { read: true });
    } catch {
      return false;
    }
    try {
      if (!file.tryLockSync(true)) return true;
      file.unlockSync();
      return false;
    } finally {
      file.close();
    }
  }

  release(): void {
    if (this.#file === null) return;
    this.#file.close();
    this.#file = null;
  }
}

function readHolder(path: string): number | null {
  try {
    const n = Number(Deno.readTextFileSync(path).trim());
    return Number.isSafeInteger(n) && n > 0 ? n : null;
  } catch {
    return null;
  }
}
