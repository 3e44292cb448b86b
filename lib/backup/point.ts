/**
 * Writing a backup point: each device's source (a snapshot image, or any
 * file) copied into a qcow2 file, fully or only the changed byte ranges with
 * the previous point's file as backing file, and the manifest last.
 *
 * Reads overlap with the work: the next piece (4 MiB) is read asynchronously
 * (Deno's file reads run on its I/O threads) while the current one is
 * checked for zeroes, hashed, compressed when asked and appended to the
 * qcow2 file on this thread.
 *
 * @module
 */
import { BlksnapError, toBlksnapError } from "../engine/errors.ts";
import { Qcow2Writer } from "./qcow2.ts";
import { type ByteRange, changedRanges, fullReason, rangeBytes } from "./changes.ts";
import {
  type DeviceEntry,
  deviceFileName,
  deviceKey,
  type Manifest,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  pointId,
  points,
  syncDir,
  TMP_PREFIX,
  writeManifest,
} from "./manifest.ts";
import { chainProblem } from "./chain.ts";
import { ExtentBuilder } from "./extents.ts";

/** Largest read from the source, and the most one extent's checksum covers. */
export const PIECE_BYTES = 4 * 1024 * 1024;

/** The CBT state of a device at the snapshot (readcbtmap). */
export interface CbtState {
  generationId: string;
  changesNumber: number;
  blockBytes: number;
  /** The frozen map, one change number per block; null when it could not be read. */
  map: Uint8Array | null;
}

export interface DeviceSource {
  /** The device as recorded (the original the daemon tracks). */
  original: string;
  /** What to read: the snapshot image, or a file. */
  source: string;
  cbt: CbtState | null;
}

export interface WritePointOptions {
  devices: DeviceSource[];
  snapshotId: string | null;
  /** When the snapshot was taken (default: now). */
  time?: Date;
  /** log2 of the cluster size (default 16). */
  clusterBits?: number;
  compress?: boolean;
  /** Make every device full, with this reason. */
  forceFull?: string;
  /** Called as bytes are read: done and total over all devices. */
  onProgress?: (done: number, total: number) => void;
  /** Write no point (return null) when every device is incremental with nothing changed. */
  skipUnchanged?: boolean;
  /** Stops the copy (between pieces) with the signal's reason. */
  signal?: AbortSignal;
  /**
   * Called when every file is written and synced, before any is renamed and
   * before the manifest: throwing here (the snapshot overflowed) leaves no point.
   */
  beforeCommit?: () => Promise<void>;
}

/** A source opened for reading, with its size (block devices: by seeking to the end). */
export async function openSource(path: string): Promise<{ file: Deno.FsFile; sizeBytes: number }> {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (err) {
    throw new BlksnapError("ENOENT", `Cannot open the source ${path}: ${(err as Error).message}`);
  }
  try {
    const info = await file.stat();
    const sizeBytes = info.isFile ? info.size : await file.seek(0, Deno.SeekMode.End);
    if (!info.isFile && !info.isBlockDevice) {
      throw new BlksnapError("EINVAL", `The source ${path} is not a file or block device`);
    }
    if (sizeBytes <= 0 || sizeBytes % 512 !== 0) {
      throw new BlksnapError(
        "EINVAL",
        `The source ${path} has ${sizeBytes} bytes (not a positive multiple of 512)`,
      );
    }
    return { file, sizeBytes };
  } catch (err) {
    file.close();
    throw err;
  }
}

async function readAt(file: Deno.FsFile, offset: number, into: Uint8Array): Promise<number> {
  await file.seek(offset, Deno.SeekMode.Start);
  let done = 0;
  while (done < into.length) {
    const n = await file.read(into.subarray(done));
    if (n === null) break;
    done += n;
  }
  return done;
}

/** Splits cluster-aligned ranges into pieces of at most PIECE_BYTES. */
export function pieces(ranges: ByteRange[], clusterBytes: number): ByteRange[] {
  const size = Math.max(clusterBytes, Math.floor(PIECE_BYTES / clusterBytes) * clusterBytes);
  const out: ByteRange[] = [];
  for (const r of ranges) {
    for (let at = r.start; at < r.end; at += size) {
      out.push({ start: at, end: Math.min(r.end, at + size) });
    }
  }
  return out;
}

/**
 * Copies `ranges` of `file` into `writer`, reading the next piece while the
 * current one is stored. Returns the bytes read.
 */
export async function copyRanges(
  file: Deno.FsFile,
  source: string,
  writer: Qcow2Writer,
  ranges: ByteRange[],
  extents: ExtentBuilder,
  progress: (bytes: number) => void,
  signal?: AbortSignal,
): Promise<number> {
  const cb = writer.clusterBytes;
  const list = pieces(ranges, cb);
  if (list.length === 0) return 0;
  const bufSize = Math.max(cb, Math.floor(PIECE_BYTES / cb) * cb);
  const bufs = [new Uint8Array(bufSize), new Uint8Array(bufSize)];
  const start = (i: number) => {
    const p = list[i]!;
    return readAt(file, p.start, bufs[i % 2]!.subarray(0, p.end - p.start));
  };
  let pending: Promise<number> = start(0);
  let bytesRead = 0;
  try {
    for (let i = 0; i < list.length; i++) {
      const p = list[i]!;
      const got = await pending;
      signal?.throwIfAborted();
      if (got !== p.end - p.start) {
        throw new BlksnapError(
          "EIO",
          `Short read of ${source} at ${p.start}: ${got} of ${p.end - p.start} bytes`,
        );
      }
      if (i + 1 < list.length) pending = start(i + 1);
      const buf = bufs[i % 2]!;
      bytesRead += got;
      for (let at = p.start; at < p.end; at += cb) {
        const data = buf.subarray(at - p.start, Math.min(p.end, at + cb) - p.start);
        const before = writer.stats.data + writer.stats.compressed;
        writer.writeCluster(at / cb, data);
        if (writer.stats.data + writer.stats.compressed !== before) extents.add(at, data);
      }
      progress(got);
    }
  } catch (err) {
    // The next piece's read may still be running: let it end before the
    // caller closes the source under it.
    await pending.catch(() => {});
    throw err;
  }
  extents.flush();
  return bytesRead;
}

interface Plan {
  src: DeviceSource;
  file: Deno.FsFile;
  sizeBytes: number;
  key: string;
  kind: "full" | "incremental";
  reason: string;
  backing: string | null;
  ranges: ByteRange[];
}

/**
 * Writes one point into `dir` (the caller holds the directory's lock) and
 * returns its manifest. Nothing is left behind on failure but `.tmp.` files
 * that are removed here or by the next run.
 */
export async function writePoint(
  dir: string,
  options: WritePointOptions,
): Promise<Manifest | null> {
  if (options.devices.length === 0) throw new BlksnapError("EINVAL", "No device to back up");
  const clusterBits = options.clusterBits ?? 16;
  const clusterBytes = 2 ** clusterBits;
  const compress = options.compress ?? false;
  const time = options.time ?? new Date();
  const existing = points(dir);
  const prev = existing.at(-1);
  const id = pointId(time, existing.map((m) => m.id));
  const plans: Plan[] = [];
  try {
    const keys: string[] = [];
    for (const src of options.devices) {
      const { file, sizeBytes } = await openSource(src.source);
      const before = prev?.devices.find((d) => d.original === src.original);
      const key = before?.key !== undefined && !keys.includes(before.key)
        ? before.key
        : deviceKey(src.original, keys);
      keys.push(key);
      const plan: Plan = {
        src,
        file,
        sizeBytes,
        key,
        kind: "full",
        reason: "",
        backing: null,
        ranges: [{ start: 0, end: sizeBytes }],
      };
      plans.push(plan);
      let why = options.forceFull ?? fullReason(before, {
        generationId: src.cbt?.generationId ?? null,
        changesNumber: src.cbt?.changesNumber ?? null,
        sizeBytes,
        clusterBytes,
      });
      if (why === null && src.cbt!.map === null) why = "the change map could not be read";
      if (why === null && before!.key !== key) why = "the device's file name key changed";
      if (why === null) {
        const broken = chainProblem(dir, prev!, before!.key);
        if (broken !== null) why = `the previous point cannot be used: ${broken}`;
      }
      if (why === null) {
        const cbt = src.cbt!;
        if (cbt.map!.length !== Math.ceil(sizeBytes / cbt.blockBytes)) {
          why = `the change map has ${cbt.map!.length} blocks of ${cbt.blockBytes} bytes, ` +
            `not ${Math.ceil(sizeBytes / cbt.blockBytes)} for ${sizeBytes} bytes`;
        }
      }
      if (why !== null) {
        plan.reason = why;
        continue;
      }
      plan.kind = "incremental";
      plan.backing = before!.file;
      plan.ranges = changedRanges(
        src.cbt!.map!,
        before!.changesNumber!,
        src.cbt!.blockBytes,
        sizeBytes,
        clusterBytes,
      );
    }

    const total = plans.reduce((n, p) => n + rangeBytes(p.ranges), 0);
    if (options.skipUnchanged && total === 0 && plans.every((p) => p.kind === "incremental")) {
      return null;
    }
    let done = 0;
    const entries: DeviceEntry[] = [];
    const written: string[] = [];
    try {
      for (const p of plans) {
        const name = deviceFileName(id, p.key);
        const tmp = `${dir}/${TMP_PREFIX}${name}`;
        const writer = Qcow2Writer.create(tmp, {
          sizeBytes: p.sizeBytes,
          clusterBits,
          compress,
          ...(p.backing !== null ? { backingFile: p.backing } : {}),
        });
        written.push(tmp);
        const extents = new ExtentBuilder();
        let bytesRead: number;
        try {
          bytesRead = await copyRanges(p.file, p.src.source, writer, p.ranges, extents, (n) => {
            done += n;
            options.onProgress?.(done, total);
          }, options.signal);
          writer.finish();
        } catch (err) {
          writer.abort();
          if (options.signal?.aborted) throw err;
          throw toBlksnapError(err, `Backing up ${p.src.source} into ${tmp}`);
        }
        entries.push({
          original: p.src.original,
          key: p.key,
          file: name,
          sizeBytes: p.sizeBytes,
          clusterBytes,
          kind: p.kind,
          reason: p.reason,
          backing: p.backing,
          generationId: p.src.cbt?.generationId ?? null,
          changesNumber: p.src.cbt?.changesNumber ?? null,
          cbtBlockBytes: p.src.cbt?.blockBytes ?? null,
          bytesRead,
          bytesStored: writer.stats.storedBytes,
          fileBytes: Deno.statSync(tmp).size,
          compressed: compress,
          extents: extents.extents,
        });
      }
      await options.beforeCommit?.();
      // Every file complete and synced: give them their names, then the manifest.
      for (const e of entries) Deno.renameSync(`${dir}/${TMP_PREFIX}${e.file}`, `${dir}/${e.file}`);
      syncDir(dir);
    } catch (err) {
      for (const f of written) {
        try {
          Deno.removeSync(f);
        } catch { /* not there */ }
      }
      throw err;
    }
    const incremental = entries.some((e) => e.kind === "incremental");
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      version: MANIFEST_VERSION,
      id,
      sequence: (existing[existing.length - 1]?.sequence ?? 0) + 1,
      time: time.toISOString(),
      kind: incremental ? "incremental" : "full",
      reason: entries.filter((e) => e.kind === "full").map((e) => `${e.key}: ${e.reason}`).join(
        "; ",
      ),
      previous: incremental ? prev!.id : null,
      snapshotId: options.snapshotId,
      devices: entries,
    };
    try {
      writeManifest(dir, manifest);
    } catch (err) {
      for (const e of entries) {
        try {
          Deno.removeSync(`${dir}/${e.file}`);
        } catch { /* not there */ }
      }
      throw err;
    }
    return manifest;
  } finally {
    for (const p of plans) p.file.close();
  }
}
