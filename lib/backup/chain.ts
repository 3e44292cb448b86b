/**
 * Reading points back: the chain of a device (a point's qcow2 file and its
 * backing files), verification of every checksum, restore, and pruning.
 *
 * The chain is what the qcow2 headers say (what qemu-img sees); the
 * manifests give the checksums. A point's file may have been made
 * self-contained by a prune whose manifest update a crash interrupted: its
 * header has no backing file while its manifest still names one. Its content
 * is the same, so that is accepted (and the next prune finishes the update).
 *
 * @module
 */
import { createHash } from "node:crypto";
import { BlksnapError } from "../engine/errors.ts";
import { type ClusterKind, Qcow2Image, Qcow2Writer } from "./qcow2.ts";
import {
  cleanLeftovers,
  type DeviceEntry,
  type Manifest,
  manifestName,
  points,
  readManifest,
  syncDir,
  TMP_PREFIX,
  writeManifest,
} from "./manifest.ts";
import { ExtentBuilder } from "./extents.ts";

/** One point's file of a device in a chain. */
export interface Link {
  manifest: Manifest;
  device: DeviceEntry;
  path: string;
}

/** The point id a backing file name belongs to ("ID.KEY.qcow2"). */
function backingPoint(backing: string): string {
  return backing.slice(0, backing.indexOf("."));
}

/** The device `key` of `top`, or the only device when `key` is undefined. */
export function pickDevice(top: Manifest, key: string | undefined): DeviceEntry {
  if (key === undefined) {
    if (top.devices.length === 1) return top.devices[0]!;
    throw new BlksnapError(
      "EINVAL",
      `Point ${top.id} holds ${top.devices.length} devices (${
        top.devices.map((d) => d.key).join(", ")
      }): say which with --device`,
    );
  }
  const d = top.devices.find((e) => e.key === key || e.original === key);
  if (d === undefined) {
    throw new BlksnapError(
      "ENOENT",
      `Point ${top.id} has no device "${key}" (it has ${top.devices.map((e) => e.key).join(", ")})`,
    );
  }
  return d;
}

/**
 * The links of device `key` from `top` down to its full point, from the
 * manifests and the files' headers. Throws a "broken chain" error naming the
 * point whose manifest or file is missing.
 */
export function deviceChain(dir: string, top: Manifest, key: string): Link[] {
  const links: Link[] = [];
  let manifest = top;
  let device = pickDevice(top, key);
  for (;;) {
    const path = `${dir}/${device.file}`;
    let backing: string | undefined;
    try {
      using img = Qcow2Image.open(path);
      backing = img.backingFile;
      if (img.sizeBytes !== device.sizeBytes || img.clusterBytes !== device.clusterBytes) {
        throw new BlksnapError(
          "EINVAL",
          `${path}: ${img.sizeBytes} bytes in ${img.clusterBytes}-byte clusters, the manifest says ` +
            `${device.sizeBytes} in ${device.clusterBytes}`,
        );
      }
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) {
        throw new BlksnapError(
          "ENOENT",
          `Broken chain: point ${manifest.id}, device ${device.key}: its file ${path} is missing`,
        );
      }
      throw err;
    }
    links.push({ manifest, device, path });
    if (backing === undefined) return links;
    if (backing !== device.backing) {
      throw new BlksnapError(
        "EINVAL",
        `Point ${manifest.id}, device ${device.key}: the file's backing file is "${backing}", ` +
          `the manifest says ${JSON.stringify(device.backing)}`,
      );
    }
    const prevId = backingPoint(backing);
    if (links.some((l) => l.manifest.id === prevId)) {
      throw new BlksnapError("EINVAL", `Point ${manifest.id}: the chain loops at ${prevId}`);
    }
    let prev: Manifest;
    try {
      prev = readManifest(dir, prevId);
    } catch (err) {
      throw new BlksnapError(
        "ENOENT",
        `Broken chain: point ${manifest.id}, device ${device.key} builds on point ${prevId}, ` +
          `which cannot be read: ${(err as Error).message}`,
      );
    }
    const next = prev.devices.find((d) => d.file === backing);
    if (next === undefined) {
      throw new BlksnapError(
        "ENOENT",
        `Broken chain: point ${prevId} has no device file ${backing} (needed by ${manifest.id})`,
      );
    }
    if (next.sizeBytes !== device.sizeBytes) {
      throw new BlksnapError(
        "EINVAL",
        `Point ${manifest.id}, device ${device.key}: ${device.sizeBytes} bytes, its backing ` +
          `point ${prevId} ${next.sizeBytes}`,
      );
    }
    manifest = prev;
    device = next;
  }
}

/** Why the chain of device `key` of `top` is unusable, or null. */
export function chainProblem(dir: string, top: Manifest, key: string): string | null {
  try {
    deviceChain(dir, top, key);
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}

/** Reads a device's content through its chain. */
export class ChainReader {
  readonly links: Link[];
  readonly sizeBytes: number;
  readonly clusterBytes: number;
  readonly clusterCount: number;
  readonly #images: Qcow2Image[] = [];

  constructor(dir: string, top: Manifest, key: string) {
    this.links = deviceChain(dir, top, key);
    try {
      for (const l of this.links) this.#images.push(Qcow2Image.open(l.path));
    } catch (err) {
      this.close();
      throw err;
    }
    this.sizeBytes = this.links[0]!.device.sizeBytes;
    this.clusterBytes = this.links[0]!.device.clusterBytes;
    this.clusterCount = Math.ceil(this.sizeBytes / this.clusterBytes);
  }

  /** Reads cluster `index` into `into` (clusterBytes); returns false when it reads as zeroes. */
  readCluster(index: number, into: Uint8Array): boolean {
    for (const img of this.#images) {
      const kind: ClusterKind = img.readCluster(index, into);
      if (kind === "zero") return false;
      if (kind !== "unallocated") return true;
    }
    into.fill(0, 0, this.clusterBytes);
    return false;
  }

  close(): void {
    for (const img of this.#images) img.close();
    this.#images.length = 0;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** What verify found wrong first. */
export interface Problem {
  point: string;
  device: string;
  /** The bad extent (absent when the problem is the chain or the file). */
  offset?: number;
  length?: number;
  message: string;
}

export interface VerifyResult {
  ok: boolean;
  /** The points checked, newest first. */
  points: string[];
  extents: number;
  bytes: number;
  problem?: Problem;
}

/**
 * Checks the point `id` of `dir` and every point its devices build on: the
 * chain is whole, each file's stored clusters are exactly the extents of its
 * manifest, and each extent's content has its sha256. Stops at the first
 * problem and names it.
 */
export function verifyPoint(dir: string, id: string): VerifyResult {
  const top = readManifest(dir, id);
  const result: VerifyResult = { ok: true, points: [], extents: 0, bytes: 0 };
  const seen = new Set<string>();
  for (const dev of top.devices) {
    let links: Link[];
    try {
      links = deviceChain(dir, top, dev.key);
    } catch (err) {
      result.ok = false;
      result.problem = { point: top.id, device: dev.key, message: (err as Error).message };
      return result;
    }
    for (const link of links) {
      if (seen.has(link.path)) continue;
      seen.add(link.path);
      if (!result.points.includes(link.manifest.id)) result.points.push(link.manifest.id);
      const problem = verifyLink(link, result);
      if (problem !== null) {
        result.ok = false;
        result.problem = problem;
        return result;
      }
    }
  }
  return result;
}

function verifyLink(link: Link, result: VerifyResult): Problem | null {
  const { manifest, device } = link;
  const where = (offset?: number, length?: number) => ({
    point: manifest.id,
    device: device.key,
    ...(offset !== undefined ? { offset, length: length! } : {}),
  });
  let img: Qcow2Image;
  try {
    img = Qcow2Image.open(link.path);
  } catch (err) {
    return { ...where(), message: (err as Error).message };
  }
  try {
    const cb = img.clusterBytes;
    const buf = new Uint8Array(cb);
    // Absorbed by a prune whose manifest update did not happen: only the extents are checked.
    const absorbed = img.backingFile === undefined && device.backing !== null;
    const covered = new Uint8Array(img.clusterCount);
    for (const x of device.extents) {
      const hash = createHash("sha256");
      const bad = (why: string): Problem => ({
        ...where(x.offset, x.length),
        message: `Point ${manifest.id}, device ${device.key}: the extent at byte ${x.offset} ` +
          `(${x.length} bytes) ${why}`,
      });
      for (let at = x.offset; at < x.offset + x.length; at += cb) {
        const c = at / cb;
        let kind: ClusterKind;
        try {
          kind = img.readCluster(c, buf);
        } catch (err) {
          return bad(`cannot be read: ${(err as Error).message}`);
        }
        if (kind !== "data" && kind !== "compressed") return bad(`is not stored (${kind})`);
        covered[c] = 1;
        hash.update(buf.subarray(0, Math.min(cb, x.offset + x.length - at)));
      }
      if (hash.digest("hex") !== x.sha256) return bad("does not match its checksum");
      result.extents++;
      result.bytes += x.length;
    }
    if (!absorbed) {
      for (let c = 0; c < img.clusterCount; c++) {
        const kind = img.kind(c);
        if ((kind === "data" || kind === "compressed") && covered[c] === 0) {
          return {
            ...where(c * cb, Math.min(cb, img.sizeBytes - c * cb)),
            message: `Point ${manifest.id}, device ${device.key}: cluster at byte ${c * cb} is ` +
              "stored but in no extent of the manifest",
          };
        }
      }
    }
  } catch (err) {
    return { ...where(), message: (err as Error).message };
  } finally {
    img.close();
  }
  return null;
}

/** Where restore writes: a file or a block device. */
export interface RestoreTarget {
  readonly path: string;
  readonly sizeBytes: number;
  /** A new file: all zeroes, so zero clusters need no writing. */
  readonly fresh: boolean;
  /**
   * Writes `data` at `offset`; it may run on Deno's I/O threads while the
   * caller reads on. The caller awaits one write before it starts the next
   * write or zero(), and leaves `data` alone meanwhile.
   */
  write(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Makes `length` bytes at `offset` read as zeroes, without writing them
   * where it can: nothing in a new file (a hole), fallocate on a device or an
   * existing file, zeroes written in large runs where that is refused.
   */
  zero(offset: number, length: number): Promise<void>;
  /** Makes the writes durable (and gives a new file its name). */
  commit(): void;
  /** Closes; a new file not committed is removed. */
  close(): void;
}

export interface RestoreResult {
  point: string;
  device: string;
  target: string;
  sizeBytes: number;
  /** Bytes of data written. */
  bytesWritten: number;
  /** Bytes made zero without writing them (holes, fallocate), or by the fallback's runs. */
  bytesZeroed: number;
  verified: boolean;
}

/** Most bytes of a restore piece (a read of the chain, a write to the target). */
const RESTORE_PIECE_BYTES = 4 * 1024 * 1024;

/**
 * Writes the content of device `key` of point `id` to `target`. Unless
 * `verify` is false, the chain is verified first and a bad point is refused.
 * Each piece of the chain is read (and inflated) while the previous one is
 * being written; clusters that read as zeroes are not written but cleared
 * (target.zero()), a run of them at once.
 */
export async function restorePoint(
  dir: string,
  id: string,
  key: string | undefined,
  target: RestoreTarget,
  options: { verify?: boolean; onProgress?: (done: number, total: number) => void } = {},
): Promise<RestoreResult> {
  const top = readManifest(dir, id);
  const device = pickDevice(top, key);
  refuseChainFile(dir, top, device.key, target.path);
  if (target.sizeBytes < device.sizeBytes) {
    throw new BlksnapError(
      "ENOSPC",
      `The target ${target.path} has ${target.sizeBytes} bytes, less than the ${device.sizeBytes} ` +
        `of device ${device.key} in point ${id}`,
    );
  }
  const verify = options.verify ?? true;
  if (verify) {
    const v = verifyPoint(dir, id);
    if (!v.ok) {
      throw new BlksnapError(
        "EBADMSG",
        `Point ${id} is damaged, nothing was restored: ${v.problem!.message}`,
      );
    }
  }
  using reader = new ChainReader(dir, top, device.key);
  const cb = reader.clusterBytes;
  const per = Math.max(1, Math.floor(RESTORE_PIECE_BYTES / cb));
  // Two buffers: one being written (asynchronously) while the next piece is read into the other.
  const bufs = [new Uint8Array(per * cb), new Uint8Array(per * cb)];
  let writing: Promise<void> = Promise.resolve();
  const lastWrite: Promise<void>[] = [writing, writing];
  let written = 0;
  let zeroed = 0;
  /** A run of zero clusters not cleared yet: they are cleared in one call. */
  let zeroFrom = -1;
  let zeroTo = -1;
  const flushZeroes = async () => {
    if (zeroFrom < 0) return;
    await writing;
    await target.zero(zeroFrom, zeroTo - zeroFrom);
    zeroed += zeroTo - zeroFrom;
    zeroFrom = zeroTo = -1;
  };
  try {
    for (let c = 0, piece = 0; c < reader.clusterCount; c += per, piece++) {
      const n = Math.min(per, reader.clusterCount - c);
      const buf = bufs[piece % 2]!;
      // This buffer's last write (two pieces ago) must be done; the previous
      // piece's may still run while this one is read (and inflated).
      await lastWrite[piece % 2];
      const isData = new Uint8Array(n);
      for (let i = 0; i < n; i++) {
        isData[i] = reader.readCluster(c + i, buf.subarray(i * cb, (i + 1) * cb)) ? 1 : 0;
      }
      // Runs of data clusters are written, runs of zero clusters cleared.
      for (let i = 0; i < n;) {
        let j = i;
        while (j < n && isData[j] === isData[i]) j++;
        const offset = (c + i) * cb;
        const end = Math.min((c + j) * cb, device.sizeBytes);
        if (isData[i]) {
          await flushZeroes();
          await writing;
          writing = target.write(offset, buf.subarray(i * cb, i * cb + (end - offset)));
          writing.catch(() => {}); // awaited below; a failure is not "unhandled" meanwhile
          lastWrite[piece % 2] = writing;
          written += end - offset;
        } else if (zeroTo === offset) {
          zeroTo = end;
        } else {
          await flushZeroes();
          zeroFrom = offset;
          zeroTo = end;
        }
        i = j;
      }
      options.onProgress?.(Math.min((c + n) * cb, device.sizeBytes), device.sizeBytes);
    }
    await flushZeroes();
  } finally {
    await writing.catch(() => {});
  }
  target.commit();
  return {
    point: id,
    device: device.key,
    target: target.path,
    sizeBytes: device.sizeBytes,
    bytesWritten: written,
    bytesZeroed: zeroed,
    verified: verify,
  };
}

/** A restore onto a file of the point's own chain (or its manifest) would destroy it. */
function refuseChainFile(dir: string, top: Manifest, key: string, target: string): void {
  let real: string;
  try {
    real = Deno.realPathSync(target);
  } catch {
    return; // a new file
  }
  const own = [`${dir}/${manifestName(top.id)}`];
  try {
    for (const l of deviceChain(dir, top, key)) {
      own.push(l.path, `${dir}/${manifestName(l.manifest.id)}`);
    }
  } catch { /* verify reports a broken chain */ }
  for (const f of own) {
    try {
      if (Deno.realPathSync(f) === real) {
        throw new BlksnapError(
          "EINVAL",
          `The target ${target} is a file of point ${top.id}'s chain: restoring onto it would destroy it`,
        );
      }
    } catch (err) {
      if (err instanceof BlksnapError) throw err;
    }
  }
}

/**
 * A restore target that is a regular file: a missing one is created sparse
 * under a temporary name and gets its name (and `sizeBytes`) at commit; an
 * existing one is written in place, like a device.
 */
export function openFileTarget(path: string, sizeBytes: number): RestoreTarget {
  let info: Deno.FileInfo | null = null;
  try {
    info = Deno.statSync(path);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  if (info !== null && !info.isFile) {
    throw new BlksnapError("EINVAL", `The target ${path} is not a regular file`);
  }
  const fresh = info === null;
  const slash = path.lastIndexOf("/");
  const parent = slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
  const tmp = fresh ? `${parent}/.${path.slice(slash + 1)}.restore-${Deno.pid}` : path;
  const file = Deno.openSync(tmp, fresh ? { write: true, createNew: true } : { write: true });
  let closed = false;
  let committed = false;
  return {
    path,
    sizeBytes: fresh ? sizeBytes : info!.size,
    fresh,
    write: (offset, data) => writeAt(file, offset, data),
    // A new file: the range is a hole already (commit() sets the size). An
    // existing file: zeroes written in runs (openTarget() punches holes instead).
    zero: (offset, length) =>
      fresh ? Promise.resolve() : writeZeroes((o, d) => writeAt(file, o, d), offset, length),
    commit() {
      if (fresh) file.truncateSync(sizeBytes);
      file.syncSync();
      if (fresh) {
        Deno.renameSync(tmp, path);
        syncDir(parent);
      }
      committed = true;
    },
    close() {
      if (closed) return;
      closed = true;
      file.close();
      if (fresh && !committed) {
        try {
          Deno.removeSync(tmp);
        } catch { /* gone */ }
      }
    },
  };
}

/** Writes all of `data` at `offset` of `file` (Deno's I/O threads do the write). */
export async function writeAt(file: Deno.FsFile, offset: number, data: Uint8Array): Promise<void> {
  await file.seek(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < data.length) done += await file.write(data.subarray(done));
}

const ZERO_RUN = new Uint8Array(4 * 1024 * 1024);

/** Writes `length` zero bytes at `offset` with `write`, 4 MiB at a time. */
export async function writeZeroes(
  write: (offset: number, data: Uint8Array) => Promise<void>,
  offset: number,
  length: number,
): Promise<void> {
  for (let at = 0; at < length; at += ZERO_RUN.length) {
    await write(offset + at, ZERO_RUN.subarray(0, Math.min(ZERO_RUN.length, length - at)));
  }
}

/** Restores into a regular file (created when missing). */
export async function restoreToFile(
  dir: string,
  id: string,
  key: string | undefined,
  path: string,
  options: { verify?: boolean } = {},
): Promise<RestoreResult> {
  const top = readManifest(dir, id);
  const target = openFileTarget(path, pickDevice(top, key).sizeBytes);
  try {
    return await restorePoint(dir, id, key, target, options);
  } finally {
    target.close();
  }
}

// ---------------------------------------------------------------------------
// Pruning

export interface PruneResult {
  kept: string[];
  removed: string[];
  /** Points rewritten self-contained (they absorbed what they needed of removed ones). */
  absorbed: string[];
}

/**
 * Keeps the newest `keep` points of `dir` (the caller holds its lock). A kept
 * point whose device builds on a point to be removed is first rewritten
 * self-contained: its qcow2 under a temporary name, synced and renamed over
 * (same content, so the points that build on it stay correct), then its
 * manifest. Then the removed points go, newest first, each manifest before
 * its files: at every step each remaining point's chain is whole.
 */
export function prune(
  dir: string,
  keep: number,
  options: {
    /** Called after each durable step (tests stop there, as a crash would). */
    step?: (what: string) => void;
  } = {},
): PruneResult {
  const step = options.step ?? (() => {});
  // What an interrupted backup or prune left (files of removed manifests, .tmp. files).
  cleanLeftovers(dir);
  if (!Number.isSafeInteger(keep) || keep < 1) {
    throw new BlksnapError("EINVAL", `--keep must be a whole number of at least 1, not ${keep}`);
  }
  const all = points(dir);
  const kept = all.slice(Math.max(0, all.length - keep));
  const gone = all.slice(0, Math.max(0, all.length - keep));
  const goneIds = new Set(gone.map((m) => m.id));
  const absorbed: string[] = [];
  for (const m of kept) {
    // A device to absorb builds on a point to be removed, or was absorbed by a
    // prune that stopped before its manifest was updated.
    const needs = m.devices.filter((d) =>
      d.backing !== null &&
      (goneIds.has(backingPoint(d.backing)) || !hasBacking(`${dir}/${d.file}`))
    );
    if (needs.length === 0) continue;
    const v = verifyPoint(dir, m.id);
    if (!v.ok) {
      throw new BlksnapError(
        "EBADMSG",
        `Not pruning: point ${m.id} would absorb older points, but its chain is damaged: ` +
          v.problem!.message,
      );
    }
    const devices: DeviceEntry[] = [];
    for (const d of m.devices) {
      if (!needs.includes(d)) {
        devices.push(d);
        continue;
      }
      devices.push(absorb(dir, m, d));
      step(`absorbed ${d.file}`);
    }
    const full = devices.every((d) => d.kind === "full");
    const updated: Manifest = {
      ...m,
      devices,
      kind: full ? "full" : "incremental",
      previous: full ? null : m.previous,
      reason: devices.filter((d) => d.kind === "full").map((d) => `${d.key}: ${d.reason}`).join(
        "; ",
      ),
    };
    writeManifest(dir, updated);
    step(`rewrote ${manifestName(m.id)}`);
    absorbed.push(m.id);
  }
  for (const m of [...gone].reverse()) {
    Deno.removeSync(`${dir}/${manifestName(m.id)}`);
    syncDir(dir);
    step(`removed ${manifestName(m.id)}`);
    for (const d of m.devices) {
      try {
        Deno.removeSync(`${dir}/${d.file}`);
        step(`removed ${d.file}`);
      } catch (err) {
        if (!(err instanceof Deno.errors.NotFound)) throw err;
      }
    }
    syncDir(dir);
  }
  return { kept: kept.map((m) => m.id), removed: gone.map((m) => m.id), absorbed };
}

function hasBacking(path: string): boolean {
  try {
    using img = Qcow2Image.open(path);
    return img.backingFile !== undefined;
  } catch {
    return true; // unreadable: verify reports it
  }
}

/** Rewrites device `d` of point `m` self-contained; returns its new manifest entry. */
function absorb(dir: string, m: Manifest, d: DeviceEntry): DeviceEntry {
  using reader = new ChainReader(dir, m, d.key);
  const tmp = `${dir}/${TMP_PREFIX}${d.file}`;
  const writer = Qcow2Writer.create(tmp, {
    sizeBytes: d.sizeBytes,
    clusterBits: Math.log2(d.clusterBytes),
    compress: d.compressed,
  });
  const extents = new ExtentBuilder();
  try {
    const cb = d.clusterBytes;
    const buf = new Uint8Array(cb);
    for (let c = 0; c < reader.clusterCount; c++) {
      if (!reader.readCluster(c, buf)) continue;
      const data = buf.subarray(0, Math.min(cb, d.sizeBytes - c * cb));
      const before = writer.stats.data + writer.stats.compressed;
      writer.writeCluster(c, data);
      if (writer.stats.data + writer.stats.compressed !== before) extents.add(c * cb, data);
    }
    extents.flush();
    writer.finish();
  } catch (err) {
    writer.abort();
    try {
      Deno.removeSync(tmp);
    } catch { /* gone */ }
    throw err;
  }
  const fileBytes = Deno.statSync(tmp).size;
  Deno.renameSync(tmp, `${dir}/${d.file}`);
  syncDir(dir);
  return {
    ...d,
    kind: "full",
    reason: "made self-contained when the points it built on were pruned",
    backing: null,
    bytesStored: writer.stats.storedBytes,
    fileBytes,
    extents: extents.extents,
  };
}
