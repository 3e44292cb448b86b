/**
 * Writing a backup point: each device's source (a snapshot image, or any
 * file) copied into a qcow2 file, fully or only the changed byte ranges with
 * the previous point's file as backing file, and the manifest last.
 *
 * The copy runs off the main thread: a pool of workers (one per CPU, 2 to
 * 4) each reads pieces (4 MiB) of the source with its own file descriptor,
 * finds the clusters of zeroes, compresses the others when asked and hashes
 * each run of stored clusters; this thread hands out the pieces, a bounded
 * number at a time, and appends the finished ones to the qcow2 file in
 * order, so reads, compression and writes overlap. An extent (a checksummed
 * run) never crosses a piece.
 *
 * @module
 */
import { BlksnapError, ERRNO, type ErrnoName, toBlksnapError } from "../engine/errors.ts";
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
import type { Extent } from "./manifest.ts";
import { type CopyReply, type CopyRequest, CopyWork, KIND_DATA, KIND_ZERO } from "./copy_worker.ts";

/** Largest read from the source, and the most one extent's checksum covers (a piece). */
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
  /**
   * Copy workers to use when the copy is large (POOL_MIN_BYTES), started by
   * the caller ahead of time; the caller closes them. Default: a pool is
   * started here when needed.
   */
  pool?: CopyPool;
  /** Copies smaller than this run on the main thread (default POOL_MIN_BYTES). */
  poolMinBytes?: number;
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

const COPY_WORKER_URL = new URL("../../workers/backup_worker.ts", import.meta.url).href;

/** How many copy workers a backup runs: one per CPU, 2 to 4. */
export function copyWorkerCount(): number {
  return Math.max(2, Math.min(4, navigator.hardwareConcurrency || 2));
}

/** Pieces a worker may have waiting or done but not stored yet (bounds the memory). */
const PIECES_PER_WORKER = 2;

/**
 * A point that copies less than this does it on the main thread: starting
 * the workers costs more than they save (70 ms natively, seconds under QEMU's
 * TCG, where a 1% incremental took 7 times longer with them).
 */
export const POOL_MIN_BYTES = 64 * 1024 * 1024;

/** Where the pieces are done: a pool of workers, or this thread (InlineCopier). */
export interface Copier {
  readonly size: number;
  open(path: string): void;
  send(worker: number, req: CopyRequest, transfer: ArrayBuffer[]): void;
  reply(seq: number, signal?: AbortSignal): Promise<CopyReply>;
  close(): void;
}

/** The pieces done on this thread, one at a time, by the workers' own code. */
export class InlineCopier implements Copier {
  readonly size = 1;
  readonly #work = new CopyWork();
  readonly #replies = new Map<number, CopyReply>();

  open(path: string): void {
    this.#work.open(path);
  }

  send(_worker: number, req: CopyRequest): void {
    if (req.type === "piece") this.#replies.set(req.seq, this.#work.piece(req)[0]);
    else if (req.type === "open") this.#work.open(req.path);
  }

  reply(seq: number, signal?: AbortSignal): Promise<CopyReply> {
    signal?.throwIfAborted();
    const r = this.#replies.get(seq);
    if (r === undefined) throw new BlksnapError("EINVAL", `No piece ${seq} was sent`);
    this.#replies.delete(seq);
    return Promise.resolve(r);
  }

  close(): void {
    this.#work.close();
  }
}

/**
 * The copy workers of one backup (workers/backup_worker.ts): each reads the
 * pieces it is given with its own file descriptor, checks, compresses and
 * hashes them.
 */
export class CopyPool implements Copier {
  readonly #workers: Worker[] = [];
  #replies = new Map<number, CopyReply>();
  #failure: Error | null = null;
  #wake: (() => void) | null = null;

  constructor(count = copyWorkerCount()) {
    for (let i = 0; i < count; i++) {
      const w = new Worker(COPY_WORKER_URL, { type: "module", name: `backup-copy-${i}` });
      w.onmessage = (e: MessageEvent<CopyReply>) => {
        this.#replies.set(e.data.seq, e.data);
        this.#notify();
      };
      w.onerror = (e: ErrorEvent) => {
        e.preventDefault();
        this.#failure = new BlksnapError("EIO", `A backup copy worker failed: ${e.message}`);
        this.#notify();
      };
      this.#workers.push(w);
    }
  }

  get size(): number {
    return this.#workers.length;
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  /** Every worker opens `path` (the source of the pieces that follow). */
  open(path: string): void {
    for (const w of this.#workers) w.postMessage({ type: "open", path } satisfies CopyRequest);
  }

  send(worker: number, req: CopyRequest, transfer: ArrayBuffer[]): void {
    this.#workers[worker % this.#workers.length]!.postMessage(req, transfer);
  }

  /** The reply to piece `seq`, once there; stops early on a failure or `signal`. */
  async reply(seq: number, signal?: AbortSignal): Promise<CopyReply> {
    const onAbort = () => this.#notify();
    signal?.addEventListener("abort", onAbort);
    try {
      for (;;) {
        signal?.throwIfAborted();
        if (this.#failure !== null) throw this.#failure;
        const r = this.#replies.get(seq);
        if (r !== undefined) {
          this.#replies.delete(seq);
          return r;
        }
        await new Promise<void>((resolve) => (this.#wake = resolve));
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
    }
  }

  close(): void {
    for (const w of this.#workers) w.terminate();
    this.#workers.length = 0;
  }
}

/**
 * Copies `ranges` of `source` into `writer` with the workers of `pool`: up
 * to PIECES_PER_WORKER pieces per worker are read, checked, compressed and
 * hashed at once while this thread appends the finished ones in order.
 * Returns the bytes read; adds the stored runs' extents to `extents`.
 */
export async function copyRanges(
  pool: Copier,
  source: string,
  writer: Qcow2Writer,
  ranges: ByteRange[],
  compress: boolean,
  extents: Extent[],
  progress: (bytes: number) => void,
  signal?: AbortSignal,
): Promise<number> {
  const cb = writer.clusterBytes;
  const list = pieces(ranges, cb);
  if (list.length === 0) return 0;
  pool.open(source);
  const depth = pool.size * PIECES_PER_WORKER;
  const free: ArrayBuffer[] = [];
  let next = 0;
  const dispatch = (stored: number) => {
    for (; next < list.length && next - stored < depth; next++) {
      const p = list[next]!;
      const buf = free.pop() ?? null;
      pool.send(next, {
        type: "piece",
        seq: next,
        start: p.start,
        end: p.end,
        clusterBytes: cb,
        compress,
        buf,
      }, buf !== null ? [buf] : []);
    }
  };
  dispatch(0);
  let bytesRead = 0;
  for (let i = 0; i < list.length; i++) {
    const p = list[i]!;
    const r = await pool.reply(i, signal);
    if ("error" in r) {
      throw new BlksnapError(Object.hasOwn(ERRNO, r.code) ? r.code as ErrnoName : "EIO", r.error);
    }
    const length = p.end - p.start;
    const data = new Uint8Array(r.buf, 0, length);
    const packed = new Uint8Array(r.packed);
    let packedAt = 0;
    const first = p.start / cb;
    for (let k = 0; k < r.kinds.length; k++) {
      const kind = r.kinds[k];
      if (kind === KIND_ZERO) {
        writer.zeroCluster(first + k);
      } else if (kind === KIND_DATA) {
        // A run of data clusters: one write.
        let j = k + 1;
        while (j < r.kinds.length && r.kinds[j] === KIND_DATA) j++;
        writer.storeData(first + k, data.subarray(k * cb, Math.min(length, j * cb)));
        k = j - 1;
      } else {
        const n = r.packedLengths[k]!;
        writer.storeCompressed(first + k, packed.subarray(packedAt, packedAt + n));
        packedAt += n;
      }
    }
    for (const x of r.extents) extents.push(x);
    free.push(r.buf);
    bytesRead += length;
    progress(length);
    dispatch(i + 1);
  }
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
  let own = null as Copier | null;
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
    // The caller's pool (started early, while the snapshot was taken), or one of our own;
    // none for a small copy.
    const copier = (): Copier => {
      if (total < (options.poolMinBytes ?? POOL_MIN_BYTES)) return own ??= new InlineCopier();
      if (options.pool !== undefined) return options.pool;
      return own ??= new CopyPool();
    };
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
        const extents: Extent[] = [];
        let bytesRead: number;
        try {
          bytesRead = await copyRanges(
            copier(),
            p.src.source,
            writer,
            p.ranges,
            compress,
            extents,
            (n) => {
              done += n;
              options.onProgress?.(done, total);
            },
            options.signal,
          );
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
          extents,
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
    own?.close();
    for (const p of plans) p.file.close();
  }
}
