/**
 * File-backed stand-ins: a {@linkcode BlockDevice} over a regular file, with
 * hooks to delay I/O by random amounts or to inject faults.
 *
 * Deno has no positional read/write, so the I/O itself is a synchronous
 * seek + read/write done in one JS turn; the asynchrony, and so the variety
 * of interleavings, comes from the hooks, which run before and after it and
 * may await. With `pieceSectors` an I/O is done in pieces, each between its
 * own hooks, so that overlapping reads and writes really are in flight at
 * once: a read may see part of a concurrent write, as on a real device.
 *
 * @module
 */

import {
  assertSectorBuffer,
  assertSectorRange,
  type BlockDevice,
  type IoHooks,
  type IoKind,
  type IoRequest,
  SECTOR_SIZE,
} from "./block_device.ts";
import { assert, BlksnapError, toBlksnapError } from "./errors.ts";

/** Reads exactly `buf.length` bytes at `offsetBytes`; past the end of file reads zeros. */
export function preadSync(file: Deno.FsFile, buf: Uint8Array, offsetBytes: number): void {
  file.seekSync(offsetBytes, Deno.SeekMode.Start);
  let done = 0;
  while (done < buf.length) {
    const n = file.readSync(buf.subarray(done));
    if (n === null || n === 0) {
      buf.fill(0, done);
      return;
    }
    done += n;
  }
}

/** Writes all of `buf` at `offsetBytes`. */
export function pwriteSync(file: Deno.FsFile, buf: Uint8Array, offsetBytes: number): void {
  file.seekSync(offsetBytes, Deno.SeekMode.Start);
  let done = 0;
  while (done < buf.length) {
    const n = file.writeSync(buf.subarray(done));
    if (n === 0) throw new BlksnapError("EIO", `Short write at byte ${offsetBytes + done}`);
    done += n;
  }
}

/** Options of {@linkcode FileDevice.open}. */
export interface FileDeviceOptions {
  /** The backing file; created when missing. */
  readonly path: string;
  /** Size of the device; the file is truncated or extended to it. Default: the file's size. */
  readonly sizeBytes?: number;
  /** Identity of the device; default `"file:" + path`. */
  readonly deviceId?: string;
  /** Default 512. */
  readonly logicalBlockSize?: number;
  /** `bdev_io_min`; default: the logical block size. */
  readonly minIoBytes?: number;
  /** Delays and faults. */
  readonly hooks?: IoHooks;
  /** Does each read, write and discard in pieces of at most this many sectors. */
  readonly pieceSectors?: number;
}

/** Counters of the I/O a {@linkcode FileDevice} has performed. */
export interface FileDeviceStats {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  bytesRead: number;
  bytesWritten: number;
}

/** A {@linkcode BlockDevice} over a regular file. */
export class FileDevice implements BlockDevice {
  readonly sizeSectors: number;
  readonly logicalBlockSize: number;
  readonly minIoBytes: number;
  readonly deviceId: string;
  readonly path: string;
  /** Replaceable at any time by tests. */
  hooks: IoHooks;
  readonly stats: FileDeviceStats = {
    reads: 0,
    writes: 0,
    flushes: 0,
    discards: 0,
    bytesRead: 0,
    bytesWritten: 0,
  };
  #file: Deno.FsFile | null;
  readonly #pieceBytes: number;

  private constructor(
    file: Deno.FsFile,
    options: FileDeviceOptions & { sizeBytes: number },
  ) {
    this.#file = file;
    this.path = options.path;
    this.sizeSectors = options.sizeBytes / SECTOR_SIZE;
    this.logicalBlockSize = options.logicalBlockSize ?? SECTOR_SIZE;
    this.minIoBytes = options.minIoBytes ?? this.logicalBlockSize;
    this.#pieceBytes = (options.pieceSectors ?? Infinity) * SECTOR_SIZE;
    this.deviceId = options.deviceId ?? `file:${options.path}`;
    this.hooks = options.hooks ?? {};
  }

  /** Opens (creating if needed) the backing file. */
  static async open(options: FileDeviceOptions): Promise<FileDevice> {
    const file = await Deno.open(options.path, { read: true, write: true, create: true });
    try {
      let sizeBytes = options.sizeBytes;
      if (sizeBytes === undefined) {
        sizeBytes = (await file.stat()).size;
      } else {
        await file.truncate(sizeBytes);
      }
      if (sizeBytes % SECTOR_SIZE !== 0) {
        throw new BlksnapError(
          "EINVAL",
          `Size ${sizeBytes} of "${options.path}" is not whole sectors`,
        );
      }
      const logicalBlockSize = options.logicalBlockSize ?? SECTOR_SIZE;
      assert(
        logicalBlockSize >= SECTOR_SIZE && logicalBlockSize % SECTOR_SIZE === 0,
        `Bad logical block size ${logicalBlockSize}`,
      );
      const minIoBytes = options.minIoBytes ?? logicalBlockSize;
      assert(
        minIoBytes >= logicalBlockSize && minIoBytes % logicalBlockSize === 0,
        `Bad minimum I/O size ${minIoBytes}`,
      );
      const pieceSectors = options.pieceSectors ?? 1;
      assert(Number.isSafeInteger(pieceSectors) && pieceSectors > 0, "Bad piece size");
      return new FileDevice(file, { ...options, sizeBytes });
    } catch (error) {
      file.close();
      throw error;
    }
  }

  get isClosed(): boolean {
    return this.#file === null;
  }

  async read(sector: number, buf: Uint8Array): Promise<void> {
    assertSectorBuffer(buf);
    assertSectorRange(sector, buf.length / SECTOR_SIZE, this.sizeSectors);
    await this.#pieces("read", sector * SECTOR_SIZE, buf.length, (at, from, to) => {
      preadSync(this.#open(), buf.subarray(from, to), at);
    });
    this.stats.reads++;
    this.stats.bytesRead += buf.length;
  }

  async write(sector: number, buf: Uint8Array): Promise<void> {
    assertSectorBuffer(buf);
    assertSectorRange(sector, buf.length / SECTOR_SIZE, this.sizeSectors);
    await this.#pieces("write", sector * SECTOR_SIZE, buf.length, (at, from, to) => {
      pwriteSync(this.#open(), buf.subarray(from, to), at);
    });
    this.stats.writes++;
    this.stats.bytesWritten += buf.length;
  }

  async flush(): Promise<void> {
    await this.#pieces("flush", 0, 0, () => this.#open().syncDataSync());
    this.stats.flushes++;
  }

  /** Zero-fills the range: deterministic content keeps model tests exact. */
  async discard(sector: number, count: number): Promise<void> {
    assertSectorRange(sector, count, this.sizeSectors);
    await this.#pieces("discard", sector * SECTOR_SIZE, count * SECTOR_SIZE, (at, from, to) => {
      pwriteSync(this.#open(), new Uint8Array(to - from), at);
    });
    this.stats.discards++;
  }

  /** Reads the backing file directly, bypassing hooks: for checks in tests. */
  readSync(sector: number, buf: Uint8Array): void {
    assertSectorRange(sector, buf.length / SECTOR_SIZE, this.sizeSectors);
    preadSync(this.#open(), buf, sector * SECTOR_SIZE);
  }

  close(): void {
    this.#file?.close();
    this.#file = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #open(): Deno.FsFile {
    if (this.#file === null) throw new BlksnapError("ENODEV", `Device "${this.path}" is closed`);
    return this.#file;
  }

  /** Runs `move` over `[offsetBytes, +lengthBytes)` piece by piece, each between its hooks. */
  async #pieces(
    kind: IoKind,
    offsetBytes: number,
    lengthBytes: number,
    move: (atBytes: number, from: number, to: number) => void,
  ): Promise<void> {
    let done = 0;
    do {
      const to = Math.min(lengthBytes, done + this.#pieceBytes);
      const request = { kind, offsetBytes: offsetBytes + done, lengthBytes: to - done };
      await this.#hook("before", request);
      move(offsetBytes + done, done, to);
      await this.#hook("after", request);
      done = to;
    } while (done < lengthBytes);
  }

  async #hook(which: "before" | "after", request: IoRequest): Promise<void> {
    this.#open();
    const hook = this.hooks[which];
    if (hook === undefined) return;
    try {
      await hook.call(this.hooks, request);
    } catch (error) {
      throw toBlksnapError(error, `${request.kind} of "${this.path}"`);
    }
  }
}
