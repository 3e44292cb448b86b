/**
 * Backup points on disk: one JSON manifest per point and one qcow2 file per
 * device, side by side in the backup directory.
 *
 * ```
 * DIR/.lock                              flock(2) of a running backup or prune
 * DIR/.snapshot                          the snapshot a running backup uses (a crash
 *                                        leaves it: the next run destroys that snapshot)
 * DIR/20261202T071300Z.json              the manifest: the point exists iff this exists
 * DIR/20261202T071300Z.loop0.qcow2       device "loop0" of that point
 * DIR/20261203T071300Z.loop0.qcow2       an incremental: backing file 20261202T071300Z.loop0.qcow2
 * DIR/.tmp.*                             being written (removed by the next backup)
 * ```
 *
 * Every file is written under a `.tmp.` name, fsynced, renamed, and the
 * directory fsynced; the manifest is written last, so a point whose manifest
 * exists is complete.
 *
 * @module
 */
import { BlksnapError } from "../engine/errors.ts";

export const MANIFEST_FORMAT = "blksnap-backup-point";
export const MANIFEST_VERSION = 1;
export const TMP_PREFIX = ".tmp.";
export const LOCK_FILE = ".lock";
export const SNAPSHOT_FILE = ".snapshot";

/** A run of consecutive clusters this point stores, and the sha256 of their content. */
export interface Extent {
  /** Byte offset on the device (a multiple of the cluster size). */
  offset: number;
  /** Bytes (whole clusters, except at the end of the device). */
  length: number;
  /** sha256 of the device content of [offset, offset + length), hex. */
  sha256: string;
}

export type PointKind = "full" | "incremental";

export interface DeviceEntry {
  /** The original device as the daemon tracks it (or the source file). */
  original: string;
  /** A short name, unique in the point, used in file names ("loop0", "mapper-vg-root"). */
  key: string;
  /** The qcow2 file, relative to the backup directory. */
  file: string;
  /** The device's size in bytes. */
  sizeBytes: number;
  clusterBytes: number;
  kind: PointKind;
  /** Why a full backup (empty for an incremental). */
  reason: string;
  /** The previous point's qcow2 of this device (the qcow2 backing file), or null. */
  backing: string | null;
  /** The CBT generation and change number backed up (null: the source had no CBT). */
  generationId: string | null;
  changesNumber: number | null;
  /** The CBT block size in bytes, or null. */
  cbtBlockBytes: number | null;
  /** Bytes read from the source. */
  bytesRead: number;
  /** Bytes of cluster data stored (after compression). */
  bytesStored: number;
  /** Size of the qcow2 file. */
  fileBytes: number;
  compressed: boolean;
  extents: Extent[];
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  /** The point's name, also the prefix of its files. */
  id: string;
  /** 1 for the first point ever written in the directory, then +1. */
  sequence: number;
  /** ISO time of the snapshot. */
  time: string;
  /** "full" when every device is self-contained, else "incremental". */
  kind: PointKind;
  /** Why full (the devices' reasons), or "". */
  reason: string;
  /** The point this one builds on (its devices' backing files belong to it), or null. */
  previous: string | null;
  /** The snapshot the point was copied from, or null (a file source). */
  snapshotId: string | null;
  devices: DeviceEntry[];
}

export function manifestName(id: string): string {
  return `${id}.json`;
}

export function deviceFileName(id: string, key: string): string {
  return `${id}.${key}.qcow2`;
}

/** A file-name key for a device path: "/dev/mapper/vg-root" -> "mapper-vg-root". */
export function deviceKey(original: string, taken: Iterable<string> = []): string {
  const base = original.replace(/^\/dev\//, "").replace(/^\/+/, "").replaceAll("/", "-")
    .replace(/[^A-Za-z0-9._+-]/g, "_").replace(/^\.+/, "_") || "device";
  const used = new Set(taken);
  let key = base.slice(0, 100);
  for (let n = 2; used.has(key); n++) key = `${base.slice(0, 100)}-${n}`;
  return key;
}

/** A point id from a time: "20261202T071300Z" (UTC), unique among `existing`. */
export function pointId(time: Date, existing: Iterable<string>): string {
  const base = time.toISOString().replace(/\.\d+Z$/, "Z").replaceAll("-", "").replaceAll(":", "");
  const used = new Set(existing);
  let id = base;
  for (let n = 2; used.has(id); n++) id = `${base}-${n}`;
  return id;
}

const ID_RE = /^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$/;
const HEX64 = /^[0-9a-f]{64}$/;

function bad(where: string, why: string): BlksnapError {
  return new BlksnapError("EINVAL", `${where}: not a valid blksnap backup manifest: ${why}`);
}

function need(cond: boolean, where: string, why: string): void {
  if (!cond) throw bad(where, why);
}

const isCount = (v: unknown): v is number =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= 0;

/** Checks a parsed manifest's shape; `where` names it in errors. */
export function validateManifest(raw: unknown, where: string): Manifest {
  need(typeof raw === "object" && raw !== null && !Array.isArray(raw), where, "not an object");
  const m = raw as Record<string, unknown>;
  need(m.format === MANIFEST_FORMAT, where, `format is ${JSON.stringify(m.format)}`);
  need(m.version === MANIFEST_VERSION, where, `version ${JSON.stringify(m.version)} is not 1`);
  need(typeof m.id === "string" && ID_RE.test(m.id), where, "bad id");
  need(isCount(m.sequence) && (m.sequence as number) >= 1, where, "bad sequence");
  need(typeof m.time === "string" && !isNaN(Date.parse(m.time as string)), where, "bad time");
  need(m.kind === "full" || m.kind === "incremental", where, "bad kind");
  need(typeof m.reason === "string", where, "bad reason");
  need(
    m.previous === null || (typeof m.previous === "string" && ID_RE.test(m.previous)),
    where,
    "bad previous",
  );
  need(m.snapshotId === null || typeof m.snapshotId === "string", where, "bad snapshotId");
  need(Array.isArray(m.devices) && m.devices.length > 0, where, "no devices");
  const keys = new Set<string>();
  for (const [i, d] of (m.devices as unknown[]).entries()) {
    const w = `${where}: device ${i}`;
    need(typeof d === "object" && d !== null, w, "not an object");
    const e = d as Record<string, unknown>;
    need(typeof e.original === "string" && e.original !== "", w, "bad original");
    need(typeof e.key === "string" && /^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$/.test(e.key), w, "bad key");
    need(!keys.has(e.key as string), w, "key given twice");
    keys.add(e.key as string);
    need(e.file === deviceFileName(m.id as string, e.key as string), w, "bad file name");
    need(isCount(e.sizeBytes) && (e.sizeBytes as number) > 0, w, "bad sizeBytes");
    need(
      isCount(e.clusterBytes) && (e.clusterBytes as number) >= 512 &&
        ((e.clusterBytes as number) & ((e.clusterBytes as number) - 1)) === 0,
      w,
      "bad clusterBytes",
    );
    need(e.kind === "full" || e.kind === "incremental", w, "bad kind");
    need(typeof e.reason === "string", w, "bad reason");
    need(
      e.kind === "full" ? e.backing === null : typeof e.backing === "string" && e.backing !== "",
      w,
      "backing does not fit kind",
    );
    need(e.generationId === null || typeof e.generationId === "string", w, "bad generationId");
    need(
      e.changesNumber === null || (isCount(e.changesNumber) && (e.changesNumber as number) <= 255),
      w,
      "bad changesNumber",
    );
    need(e.cbtBlockBytes === null || isCount(e.cbtBlockBytes), w, "bad cbtBlockBytes");
    for (const f of ["bytesRead", "bytesStored", "fileBytes"]) need(isCount(e[f]), w, `bad ${f}`);
    need(typeof e.compressed === "boolean", w, "bad compressed");
    need(Array.isArray(e.extents), w, "no extents");
    let end = 0;
    for (const x of e.extents as unknown[]) {
      const r = x as Record<string, unknown>;
      need(typeof x === "object" && x !== null, w, "bad extent");
      need(
        isCount(r.offset) && isCount(r.length) && (r.length as number) > 0 &&
          (r.offset as number) >= end &&
          (r.offset as number) + (r.length as number) <= (e.sizeBytes as number) &&
          (r.offset as number) % (e.clusterBytes as number) === 0,
        w,
        `bad extent at ${JSON.stringify(r.offset)}`,
      );
      need(typeof r.sha256 === "string" && HEX64.test(r.sha256), w, "bad extent checksum");
      end = (r.offset as number) + (r.length as number);
    }
  }
  const anyIncremental = (m.devices as DeviceEntry[]).some((d) => d.kind === "incremental");
  need(
    (m.kind === "incremental") === anyIncremental && (m.previous !== null || !anyIncremental),
    where,
    "kind and previous do not fit the devices",
  );
  return m as unknown as Manifest;
}

/** Reads and checks DIR/ID.json. */
export function readManifest(dir: string, id: string): Manifest {
  const path = `${dir}/${manifestName(id)}`;
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new BlksnapError("ENOENT", `Backup point ${id} does not exist (no ${path})`);
    }
    throw new BlksnapError("EIO", `Cannot read ${path}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    throw bad(path, "not JSON");
  }
  const m = validateManifest(raw, path);
  if (m.id !== id) throw bad(path, `its id is ${m.id}`);
  return m;
}

/** fsync of a directory: makes renames and unlinks in it durable. */
export function syncDir(dir: string): void {
  const f = Deno.openSync(dir, { read: true });
  try {
    f.syncSync();
  } finally {
    f.close();
  }
}

/** Writes `data` to DIR/NAME atomically: a temporary name, fsync, rename, fsync of DIR. */
export function writeFileAtomic(dir: string, name: string, data: Uint8Array): void {
  const tmp = `${dir}/${TMP_PREFIX}${name}`;
  const f = Deno.openSync(tmp, { write: true, create: true, truncate: true, mode: 0o644 });
  try {
    let done = 0;
    while (done < data.length) done += f.writeSync(data.subarray(done));
    f.syncSync();
  } catch (err) {
    f.close();
    try {
      Deno.removeSync(tmp);
    } catch { /* already gone */ }
    throw err;
  }
  f.close();
  Deno.renameSync(tmp, `${dir}/${name}`);
  syncDir(dir);
}

export function writeManifest(dir: string, m: Manifest): void {
  validateManifest(m, `the manifest of ${m.id}`);
  writeFileAtomic(
    dir,
    manifestName(m.id),
    new TextEncoder().encode(JSON.stringify(m, null, 1) + "\n"),
  );
}

/** A point found in a directory, or why its manifest could not be read. */
export type Listed = { id: string; manifest: Manifest } | { id: string; error: string };

/** Every manifest of DIR, in sequence order; unreadable ones as errors (sorted by id). */
export function listPoints(dir: string): Listed[] {
  const found: Listed[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(dir)];
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new BlksnapError("ENOENT", `The backup directory ${dir} does not exist`);
    }
    if (err instanceof Error && /Not a directory/i.test(err.message)) {
      throw new BlksnapError("ENOTDIR", `${dir} is not a directory`);
    }
    throw new BlksnapError(
      "EIO",
      `Cannot read the backup directory ${dir}: ${(err as Error).message}`,
    );
  }
  for (const e of entries) {
    const m = /^(.*)\.json$/.exec(e.name);
    if (!e.isFile || m === null || !ID_RE.test(m[1]!)) continue;
    try {
      found.push({ id: m[1]!, manifest: readManifest(dir, m[1]!) });
    } catch (err) {
      found.push({ id: m[1]!, error: (err as Error).message });
    }
  }
  const seq = (l: Listed) => ("manifest" in l ? l.manifest.sequence : Infinity);
  return found.sort((a, b) => seq(a) - seq(b) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

/** The good manifests of DIR, in sequence order. */
export function points(dir: string): Manifest[] {
  return listPoints(dir).flatMap((l) => ("manifest" in l ? [l.manifest] : []));
}

/**
 * Splits a POINT argument: a manifest path (DIR/ID.json), or DIR/ID.
 * Returns the directory and the id.
 */
export function parsePointPath(point: string): { dir: string; id: string } {
  const p = point.replace(/\/+$/, "");
  const slash = p.lastIndexOf("/");
  const dir = slash < 0 ? "." : slash === 0 ? "/" : p.slice(0, slash);
  const name = p.slice(slash + 1).replace(/\.json$/, "");
  if (!ID_RE.test(name)) {
    throw new BlksnapError(
      "EINVAL",
      `"${point}" does not name a backup point (DIR/ID.json or DIR/ID, ID like 20261202T071300Z)`,
    );
  }
  return { dir, id: name };
}

/** Removes what an interrupted run left: `.tmp.` files, qcow2 files of points without manifest. */
export function cleanLeftovers(dir: string): string[] {
  const removed: string[] = [];
  const ids = new Set<string>();
  const files: string[] = [];
  for (const e of Deno.readDirSync(dir)) {
    if (!e.isFile) continue;
    if (e.name.startsWith(TMP_PREFIX)) {
      Deno.removeSync(`${dir}/${e.name}`);
      removed.push(e.name);
      continue;
    }
    const m = /^([0-9]{8}T[0-9]{6}Z(?:-[0-9]+)?)\.(json|.+\.qcow2)$/.exec(e.name);
    if (m === null) continue;
    if (m[2] === "json") ids.add(m[1]!);
    else files.push(e.name);
  }
  for (const f of files) {
    const id = f.slice(0, f.indexOf("."));
    if (!ids.has(id)) {
      Deno.removeSync(`${dir}/${f}`);
      removed.push(f);
    }
  }
  if (removed.length > 0) syncDir(dir);
  return removed;
}
