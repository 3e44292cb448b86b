/**
 * The daemon's state file: every ublk device it serves, so that the next
 * daemon (after a crash, a kill or an upgrade) knows which quiesced devices
 * are its to take over and which snapshot images to remove.
 *
 * It lives beside the control socket (`/run/blksnap/control.state` for
 * `/run/blksnap/control.sock`): tmpfs, so a reboot forgets it, as it forgets
 * the devices. It is replaced atomically: written to a temporary file,
 * fsynced, renamed over the old one, and the directory fsynced. A reader sees
 * the old content or the new, never a mix.
 *
 * A file that does not parse is an operating error with a message that says
 * what is wrong; the daemon moves it aside and goes on without it (the owner
 * tag of each ublk device, owner_tag.ts, still keeps an original from being
 * attached twice).
 */
import { BlksnapError } from "../engine/errors.ts";

export const STATE_FORMAT = "blksnap-state";
export const STATE_VERSION = 1;

/** A tracked device: the ublk device stacked on an original. */
export interface TrackedEntry {
  role: "tracked";
  ublkId: number;
  /** The original's path as the user gave it, and its "MAJ:MIN". */
  original: string;
  originalDevice: string;
  /** "/dev/ublkbN" and its "MAJ:MIN" ("" before the disk exists). */
  tracked: string;
  trackedDevice: string;
  sizeBytes: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  queues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  /** "starting" between ADD_DEV and START_DEV; "live" once it served I/O. */
  phase: "starting" | "live";
  /** The CBT map's generation id when the file was written. */
  cbtGenerationId: string;
  attachedAt: string;
}

/** A snapshot image: not persistent, removed after a crash. */
export interface ImageEntry {
  role: "image";
  ublkId: number;
  /** "MAJ:MIN" of the original it shows. */
  originalDevice: string;
  snapshotId: string;
}

export type DeviceEntry = TrackedEntry | ImageEntry;

/** A snapshot that existed when the file was written. */
export interface SnapshotEntry {
  id: string;
  /** Paths of the originals in it. */
  devices: string[];
  storage: string;
  taken: boolean;
  /**
   * Written just before a take freezes the filesystems: a daemon that dies
   * before the take ends may leave them frozen, and the next one thaws them.
   */
  taking?: boolean;
}

export interface DaemonState {
  format: typeof STATE_FORMAT;
  version: typeof STATE_VERSION;
  /** The daemon that wrote it. */
  pid: number;
  writtenAt: string;
  devices: DeviceEntry[];
  snapshots: SnapshotEntry[];
}

/** `/run/blksnap/control.sock` -> `/run/blksnap/control.state` (and `.lock`). */
export function besideSocket(socketPath: string, extension: "state" | "lock"): string {
  const slash = socketPath.lastIndexOf("/");
  const dir = slash >= 0 ? socketPath.slice(0, slash + 1) : "";
  const base = socketPath.slice(slash + 1).replace(/\.sock$/, "");
  return `${dir}${base}.${extension}`;
}

export function emptyState(): DaemonState {
  return {
    format: STATE_FORMAT,
    version: STATE_VERSION,
    pid: Deno.pid,
    writtenAt: new Date().toISOString(),
    devices: [],
    snapshots: [],
  };
}

/**
 * Replaces the file at `path` with `state`: temporary file, fsync, rename,
 * fsync of the directory. On failure the old file is untouched and the
 * temporary one removed.
 */
export function writeStateFile(path: string, state: DaemonState): void {
  const slash = path.lastIndexOf("/");
  const dir = slash > 0 ? path.slice(0, slash) : slash === 0 ? "/" : ".";
  const tmp = `${path}.tmp-${Deno.pid}`;
  const data = new TextEncoder().encode(JSON.stringify(state, null, 1) + "\n");
  try {
    const f = Deno.openSync(tmp, { write: true, create: true, truncate: true, mode: 0o600 });
    try {
      let off = 0;
      while (off < data.length) off += f.writeSync(data.subarray(off));
      f.syncSync();
    } finally {
      f.close();
    }
    Deno.renameSync(tmp, path);
  } catch (err) {
    try {
      Deno.removeSync(tmp);
    } catch {
      // never made
    }
    throw new BlksnapError(
      "EIO",
      `Cannot write the state file "${path}": ${err instanceof Error ? err.message : err}`,
    );
  }
  // The rename is durable only once the directory is.
  const d = Deno.openSync(dir, { read: true });
  try {
    d.syncSync();
  } finally {
    d.close();
  }
}

/** Reads the state file; null when there is none. A bad file is EINVAL with the reason. */
export function readStateFile(path: string): DaemonState | null {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return null;
    throw new BlksnapError(
      "EIO",
      `Cannot read the state file "${path}": ${err instanceof Error ? err.message : err}`,
    );
  }
  return parseState(text, path);
}

/** Validates the whole file; the first problem found is the error. */
export function parseState(text: string, path: string): DaemonState {
  const bad = (why: string) =>
    new BlksnapError("EINVAL", `The state file "${path}" is not valid: ${why}`);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw bad(`not JSON (${err instanceof Error ? err.message : err})`);
  }
  if (!isObject(raw)) throw bad("not a JSON object");
  if (raw.format !== STATE_FORMAT) throw bad(`"format" is not "${STATE_FORMAT}"`);
  if (raw.version !== STATE_VERSION) {
    throw bad(`version ${JSON.stringify(raw.version)}, this program reads ${STATE_VERSION}`);
  }
  if (!isCount(raw.pid)) throw bad(`"pid" is not a number`);
  if (typeof raw.writtenAt !== "string") throw bad(`"writtenAt" is not a string`);
  if (!Array.isArray(raw.devices)) throw bad(`"devices" is not a list`);
  if (!Array.isArray(raw.snapshots)) throw bad(`"snapshots" is not a list`);
  const ids = new Set<number>();
  const devices = raw.devices.map((d, i): DeviceEntry => {
    const entry = parseDevice(d, (why) => bad(`device ${i}: ${why}`));
    if (ids.has(entry.ublkId)) throw bad(`device ${i}: ublk id ${entry.ublkId} is listed twice`);
    ids.add(entry.ublkId);
    return entry;
  });
  const snapshots = raw.snapshots.map((s, i): SnapshotEntry => {
    const why = (w: string) => bad(`snapshot ${i}: ${w}`);
    if (!isObject(s)) throw why("not an object");
    if (typeof s.id !== "string") throw why(`"id" is not a string`);
    if (!Array.isArray(s.devices) || !s.devices.every((x) => typeof x === "string")) {
      throw why(`"devices" is not a list of paths`);
    }
    if (typeof s.storage !== "string") throw why(`"storage" is not a string`);
    if (typeof s.taken !== "boolean") throw why(`"taken" is not true or false`);
    if (s.taking !== undefined && typeof s.taking !== "boolean") {
      throw why(`"taking" is not true or false`);
    }
    return {
      id: s.id,
      devices: s.devices as string[],
      storage: s.storage,
      taken: s.taken,
      ...(s.taking === true ? { taking: true } : {}),
    };
  });
  return {
    format: STATE_FORMAT,
    version: STATE_VERSION,
    pid: raw.pid as number,
    writtenAt: raw.writtenAt,
    devices,
    snapshots,
  };
}

function parseDevice(d: unknown, bad: (why: string) => BlksnapError): DeviceEntry {
  if (!isObject(d)) throw bad("not an object");
  if (!isCount(d.ublkId) || (d.ublkId as number) > 0xfffff) throw bad(`"ublkId" is not an id`);
  if (!isKey(d.originalDevice)) throw bad(`"originalDevice" is not "MAJ:MIN"`);
  if (d.role === "image") {
    if (typeof d.snapshotId !== "string") throw bad(`"snapshotId" is not a string`);
    return {
      role: "image",
      ublkId: d.ublkId as number,
      originalDevice: d.originalDevice as string,
      snapshotId: d.snapshotId,
    };
  }
  if (d.role !== "tracked") throw bad(`"role" is neither "tracked" nor "image"`);
  for (const k of ["original", "tracked", "cbtGenerationId", "attachedAt"] as const) {
    if (typeof d[k] !== "string") throw bad(`"${k}" is not a string`);
  }
  if (d.trackedDevice !== "" && !isKey(d.trackedDevice)) {
    throw bad(`"trackedDevice" is not "MAJ:MIN"`);
  }
  for (
    const k of [
      "sizeBytes",
      "logicalBlockSize",
      "physicalBlockSize",
      "queues",
      "queueDepth",
      "maxIoBufBytes",
    ] as const
  ) {
    if (!isCount(d[k])) throw bad(`"${k}" is not a whole number`);
  }
  if (d.phase !== "starting" && d.phase !== "live") throw bad(`"phase" is not starting or live`);
  return {
    role: "tracked",
    ublkId: d.ublkId as number,
    original: d.original as string,
    originalDevice: d.originalDevice as string,
    tracked: d.tracked as string,
    trackedDevice: d.trackedDevice as string,
    sizeBytes: d.sizeBytes as number,
    logicalBlockSize: d.logicalBlockSize as number,
    physicalBlockSize: d.physicalBlockSize as number,
    queues: d.queues as number,
    queueDepth: d.queueDepth as number,
    maxIoBufBytes: d.maxIoBufBytes as number,
    phase: d.phase,
    cbtGenerationId: d.cbtGenerationId as string,
    attachedAt: d.attachedAt as string,
  };
}

/**
 * Moves a bad file aside (`.bad-<time>`) so that it can be looked at and the
 * daemon can write a new one; returns the new name, or null when it failed.
 */
export function moveAside(path: string): string | null {
  const aside = `${path}.bad-${new Date().toISOString().replaceAll(":", "")}`;
  try {
    Deno.renameSync(path, aside);
    return aside;
  } catch {
    return null;
  }
}

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}

function isCount(x: unknown): boolean {
  return typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
}

function isKey(x: unknown): boolean {
  return typeof x === "string" && /^\d+:\d+$/.test(x);
}
