/**
 * File-backed stand-ins: a {@linkcode BlockDevice} over a regular file, with
 * hooks to delay I/O by random amounts or to inject faults.
 *
 * Deno has no positional read/write, so the I/O itself is a synchronous
 * seek + read/write done in one JS turn (atomic with respect to other
 * operations); the asynchrony, and so the variety of interleavings, comes
 * from {@linkcode IoHooks.before}, which runs first and may await.
 *
 * @module
 */

import {
  assertSectorBuffer,
  assertSectorRange,
  type BlockDevice,
  type IoHooks,
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
  /** Delays and faults. */
  readonly hooks?: IoHooks;
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

  private constructor(
    file: Deno.FsFile,
    options: FileDeviceOptions & { sizeBytes: number },
  ) {
    this.#file = file;
    this.path = options.path;
    this.sizeSectors = options.sizeBytes / SECTOR_SIZE;
    this.logicalBlockSize = options.logicalBlockSize ?? SECTOR_SIZE;
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
    await this.#before({
      kind: "read",
      offsetBytes: sector * SECTOR_SIZE,
      lengthBytes: buf.length,
    });
    preadSync(this.#open(), buf, sector * SECTOR_SIZE);
    this.stats.reads++;
    this.stats.bytesRead += buf.length;
  }

  async write(sector: number, buf: Uint8Array): Promise<void> {
    assertSectorBuffer(buf);
    assertSectorRange(sector, buf.length / SECTOR_SIZE, this.sizeSectors);
    await this.#before({
      kind: "write",
      offsetBytes: sector * SECTOR_SIZE,
      lengthBytes: buf.length,
    });
    pwriteSync(this.#open(), buf, sector * SECTOR_SIZE);
    this.stats.writes++;
    this.stats.bytesWritten += buf.length;
  }

  async flush(): Promise<void> {
    await this.#before({ kind: "flush", offsetBytes: 0, lengthBytes: 0 });
    this.#open().syncDataSync();
    this.stats.flushes++;
  }

  /** Zero-fills the range: deterministic content keeps model tests exact. */
  async discard(sector: number, count: number): Promise<void> {
    assertSectorRange(sector, count, this.sizeSectors);
    await this.#before({
      kind: "discard",
      offsetBytes: sector * SECTOR_SIZE,
      lengthBytes: count * SECTOR_SIZE,
    });
    pwriteSync(this.#open(), new Uint8Array(count * SECTOR_SIZE), sector * SECTOR_SIZE);
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

  async #before(request: IoRequest): Promise<void> {
    this.#open();
    const before = this.hooks.before;
    if (before === undefined) return;
    try {
      await before(request);
    } catch (error) {
      throw toBlksnapError(error, `${request.kind} of "${this.path}"`);
    }
  }
}
