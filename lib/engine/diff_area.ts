/**
 * The difference area of one device in a taken snapshot (the module's
 * `diff_area`): copy-on-write of the original's chunks, the store queue that
 * moves them to the difference storage, and the I/O of the snapshot image.
 *
 * ## Copy-on-write
 *
 * Before a write may reach the original over a chunk the snapshot still
 * needs (NOT_COPIED), {@linkcode DiffArea.cow} claims the chunk (LOADING),
 * reads its old content into a buffer of the pool and makes it IN_MEMORY;
 * only then does the write proceed. The buffer joins the store queue and the
 * storer writes it to the difference storage in the background (STORING,
 * then STORED). A second writer of a LOADING chunk waits for the load; a
 * writer of a chunk in any later state passes at once. See `chunk.ts` for
 * the state machine.
 *
 * ## Back-pressure
 *
 * A claim needs a free buffer (at most `free_diff_buffer_pool_size` are held)
 * and room in the store queue (at most `chunk_maximum_in_queue` chunks loading
 * or waiting to be stored). When either is exhausted the claimer waits, in
 * arrival order, until the storer frees room: memory never grows past the
 * bounds. The storer writes up to {@linkcode STORE_CONCURRENCY} chunks at once
 * and starts as soon as a chunk is queued.
 *
 * ## Image I/O
 *
 * A read of a NOT_COPIED chunk goes to the original; when it completes the
 * chunk is looked up again, and if a copy-on-write claimed it meanwhile the
 * original may have been overwritten during the read, so the read is redone
 * from the copy (invariant 2). IN_MEMORY and STORING chunks are read from the
 * buffer, STORED ones from the difference storage. A write to the image
 * copies the chunk first (like a copy-on-write) and then changes the copy.
 *
 * ## Failure
 *
 * A failure of the machinery (no space, an I/O error while copying or
 * storing) marks the area corrupted with a negative errno and raises a
 * `corrupted` event. From then on copy-on-write is dropped — writes to the
 * original go through untouched and never wait — and image I/O fails with EIO
 * (invariant 3).
 *
 * All of it runs on one JS thread; every await is a point where other
 * operations interleave, so a chunk's state is looked up again after each.
 *
 * @module
 */

import { assertSectorBuffer, type BlockDevice, SECTOR_SIZE } from "./block_device.ts";
import { type ChunkGeometry, chunkGeometry, ChunkState, ChunkTable } from "./chunk.ts";
import { DiffBufferPool } from "./diff_buffer.ts";
import type { DiffStorage } from "./diff_storage.ts";
import { assert, BlksnapError, ERRNO, toBlksnapError } from "./errors.ts";
import type { Params } from "./params.ts";

/** Chunks written to the difference storage at once, at most. */
export const STORE_CONCURRENCY = 4;

/** Options of {@linkcode DiffArea}. */
export interface DiffAreaOptions {
  readonly device: BlockDevice;
  readonly storage: DiffStorage;
  readonly params: Params;
  /** Called once, with a negative errno, when the area becomes corrupted. */
  readonly onCorrupted?: (errorCode: number) => void;
}

/** Counters, for tests and status. */
export interface DiffAreaStats {
  /** Chunks copied from the original by copy-on-write or image writes. */
  chunksLoaded: number;
  /** Chunks written to the difference storage. */
  chunksStored: number;
  /** Image reads of the original redone from the copy after racing a copy-on-write. */
  rereads: number;
  /** Times a claimer waited for a buffer or room in the store queue. */
  backPressureWaits: number;
  /** Most chunks held in buffers at once. */
  buffersInUsePeak: number;
}

/** A FIFO of chunk numbers of fixed capacity. */
class ChunkRing {
  readonly #items: Float64Array;
  #head = 0;
  #length = 0;

  constructor(capacity: number) {
    this.#items = new Float64Array(capacity);
  }
  get length(): number {
    return this.#length;
  }
  push(n: number): void {
    assert(this.#length < this.#items.length, "Store queue overflow");
    this.#items[(this.#head + this.#length) % this.#items.length] = n;
    this.#length++;
  }
  shift(): number {
    assert(this.#length > 0, "Store queue underflow");
    const n = this.#items[this.#head]!;
    this.#head = (this.#head + 1) % this.#items.length;
    this.#length--;
    return n;
  }
}

/** The difference area of one device. */
export class DiffArea {
  readonly device: BlockDevice;
  readonly storage: DiffStorage;
  readonly geometry: ChunkGeometry;
  readonly chunks: ChunkTable;
  readonly buffers: DiffBufferPool;
  readonly stats: DiffAreaStats = {
    chunksLoaded: 0,
    chunksStored: 0,
    rereads: 0,
    backPressureWaits: 0,
    buffersInUsePeak: 0,
  };
  readonly #maximumInQueue: number;
  readonly #onCorrupted: (errorCode: number) => void;
  readonly #queue: ChunkRing;
  /** Claims holding a queue slot while their chunk loads. */
  #slotsReserved = 0;
  #storing = 0;
  #active = 0;
  #errorCode = 0;
  #closed = false;
  readonly #chunkWaiters = new Map<number, (() => void)[]>();
  #roomWaiters: (() => void)[] = [];
  #idleWaiters: (() => void)[] = [];

  constructor(options: DiffAreaOptions) {
    const { device, storage, params } = options;
    this.device = device;
    this.storage = storage;
    this.geometry = chunkGeometry(device.sizeSectors, params, device.logicalBlockSize);
    const { chunkSectors, chunkCount } = this.geometry;
    const storageSectors = storage.kind === "blockdev"
      ? storage.capacitySectors
      : Math.max(storage.limitSectors, storage.capacitySectors);
    // Records: every chunk that can be stored, plus those held in buffers.
    const maximumRecords = Math.min(
      chunkCount,
      Math.floor(storageSectors / chunkSectors) + params.freeDiffBufferPoolSize + 1,
    );
    this.chunks = new ChunkTable(maximumRecords);
    this.buffers = new DiffBufferPool({
      bufferBytes: chunkSectors * SECTOR_SIZE,
      maximumBuffers: params.freeDiffBufferPoolSize,
    });
    this.#maximumInQueue = params.chunkMaximumInQueue;
    this.#queue = new ChunkRing(params.chunkMaximumInQueue);
    this.#onCorrupted = options.onCorrupted ?? (() => {});
  }

  /** 0, or the negative errno that corrupted the area (`-ENOSPC` for an overflow). */
  get errorCode(): number {
    return this.#errorCode;
  }
  get isCorrupted(): boolean {
    return this.#errorCode !== 0;
  }
  get isClosed(): boolean {
    return this.#closed;
  }
  /** Chunks waiting in the store queue. */
  get queueLength(): number {
    return this.#queue.length;
  }
  /** Bytes of shared memory held (chunk table and buffers). */
  get byteLength(): number {
    return this.chunks.byteLength + this.buffers.byteLength;
  }

  /**
   * `diff_area_set_corrupted`: the first error wins. Raises the event, drops
   * copy-on-write and wakes writers waiting for room.
   */
  setCorrupted(errorCode: number): void {
    assert(errorCode < 0, `An error code is a negative errno, not ${errorCode}`);
    if (this.#errorCode !== 0) return;
    this.#errorCode = errorCode;
    this.#onCorrupted(errorCode);
    this.#wakeRoomWaiters();
    this.#kickStorer();
  }

  /**
   * Copy-on-write of every chunk in `[sector, sector + count)` that the
   * snapshot still needs. Resolves when the write may reach the original.
   * Never rejects for a failure of the snapshot machinery: the area is
   * marked corrupted and the write goes through.
   */
  async cow(sector: number, count: number): Promise<void> {
    if (this.#errorCode !== 0 || this.#closed || count === 0) return;
    this.#checkRange(sector, count);
    const { chunkSectors } = this.geometry;
    const first = Math.floor(sector / chunkSectors);
    const last = Math.floor((sector + count - 1) / chunkSectors);
    if (this.#allCopied(first, last)) return;
    this.#active++;
    try {
      if (first === last) {
        await this.#cowChunk(first);
      } else {
        const copies: Promise<void>[] = [];
        for (let n = first; n <= last; n++) copies.push(this.#cowChunk(n));
        await Promise.all(copies);
      }
    } finally {
      this.#leave();
    }
  }

  /** Reads the snapshot image at `sector` into `buf`. */
  async readImage(sector: number, buf: Uint8Array): Promise<void> {
    this.#checkImageIo(sector, buf);
    this.#active++;
    try {
      await this.#forEachPart(
        sector,
        buf,
        (n, partSector, part) => this.#readPart(n, partSector, part),
      );
      // After an overflow or a close the original is written without
      // copy-on-write: nothing read meanwhile can be trusted.
      this.#throwIfCorrupted();
      if (this.#closed) throw this.#gone();
    } finally {
      this.#leave();
    }
  }

  /** Writes `buf` to the snapshot image at `sector` (the original is untouched). */
  async writeImage(sector: number, buf: Uint8Array): Promise<void> {
    this.#checkImageIo(sector, buf);
    this.#active++;
    try {
      await this.#forEachPart(
        sector,
        buf,
        (n, partSector, part) => this.#writePart(n, partSector, part),
      );
    } finally {
      this.#leave();
    }
  }

  /** Resolves when nothing is in flight and the store queue is empty. */
  async settled(): Promise<void> {
    while (this.#active > 0 || this.#storing > 0 || this.#queue.length > 0) {
      await new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
    }
  }

  /**
   * Ends the area (the snapshot is being destroyed): new image I/O is
   * refused with ENODEV, waiting claimers give up copy-on-write, in-flight
   * operations are awaited, and chunks still queued are dropped.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wakeRoomWaiters();
    this.#kickStorer();
    await this.settled();
    assert(this.#slotsReserved === 0, "A claim outlived the diff area");
    assert(this.buffers.inUse === 0, "A buffer outlived the diff area");
  }

  // --- copy-on-write -------------------------------------------------------

  /** Whether every chunk of `[first, last]` is past LOADING: the common, fast case. */
  #allCopied(first: number, last: number): boolean {
    for (let n = first; n <= last; n++) {
      const state = this.chunks.state(n);
      if (state === ChunkState.NOT_COPIED || state === ChunkState.LOADING) return false;
    }
    return true;
  }

  async #cowChunk(n: number): Promise<void> {
    while (this.#errorCode === 0 && !this.#closed) {
      const state = this.chunks.state(n);
      if (state === ChunkState.LOADING) {
        await this.#chunkChanged(n);
        continue;
      }
      if (state !== ChunkState.NOT_COPIED) return;
      const buffer = await this.#reserve();
      if (buffer < 0) return;
      if (this.chunks.has(n)) {
        this.#unreserve(buffer);
        continue;
      }
      await this.#claimAndLoad(n, buffer, null);
      return;
    }
  }

  /**
   * Claims chunk `n` with `buffer` (and a reserved queue slot), loads it from
   * the original unless `overwrite` covers all of it, applies `overwrite`,
   * and queues it for storing. Returns false when the chunk failed.
   */
  async #claimAndLoad(
    n: number,
    buffer: number,
    overwrite: { offsetBytes: number; data: Uint8Array } | null,
  ): Promise<boolean> {
    if (!this.chunks.claim(n, buffer)) {
      this.#unreserve(buffer);
      this.setCorrupted(-ERRNO.ENOSPC);
      return false;
    }
    this.stats.buffersInUsePeak = Math.max(this.stats.buffersInUsePeak, this.buffers.inUse);
    const bytes = this.#chunkBytes(n);
    const view = this.buffers.view(buffer, bytes);
    const whole = overwrite !== null && overwrite.offsetBytes === 0 &&
      overwrite.data.length === bytes;
    if (!whole) {
      try {
        await this.device.read(n * this.geometry.chunkSectors, view);
      } catch {
        this.chunks.transition(n, ChunkState.LOADING, ChunkState.FAILED);
        this.#unreserve(buffer);
        this.#notifyChunk(n);
        this.setCorrupted(-ERRNO.EIO);
        return false;
      }
      this.stats.chunksLoaded++;
    }
    if (overwrite !== null) view.set(overwrite.data, overwrite.offsetBytes);
    this.chunks.transition(n, ChunkState.LOADING, ChunkState.IN_MEMORY);
    this.#slotsReserved--;
    this.#queue.push(n);
    this.#notifyChunk(n);
    this.#kickStorer();
    return true;
  }

  /** Waits for a free buffer and a queue slot; -1 when copy-on-write is off. */
  async #reserve(): Promise<number> {
    let waited = false;
    for (;;) {
      if (this.#errorCode !== 0 || this.#closed) return -1;
      if (
        (waited || this.#roomWaiters.length === 0) && this.buffers.available > 0 &&
        this.#queue.length + this.#slotsReserved < this.#maximumInQueue
      ) {
        const buffer = this.buffers.take();
        assert(buffer >= 0, "The pool had a buffer available");
        this.#slotsReserved++;
        return buffer;
      }
      if (!waited) this.stats.backPressureWaits++;
      waited = true;
      await new Promise<void>((resolve) => this.#roomWaiters.push(resolve));
    }
  }

  #unreserve(buffer: number): void {
    assert(this.#slotsReserved > 0, "Queue slot released twice");
    this.#slotsReserved--;
    this.buffers.release(buffer);
    this.#wakeRoomWaiters();
  }

  #wakeRoomWaiters(): void {
    const waiters = this.#roomWaiters;
    if (waiters.length === 0) return;
    this.#roomWaiters = [];
    for (const wake of waiters) wake();
  }

  // --- store queue ---------------------------------------------------------

  #kickStorer(): void {
    while (this.#queue.length > 0 && this.#storing < STORE_CONCURRENCY) {
      const n = this.#queue.shift();
      this.#storing++;
      this.#storeChunk(n).finally(() => {
        this.#storing--;
        this.#kickStorer();
        this.#wakeIdle();
      });
    }
  }

  /** `diff_area_store_one` + `chunk_diff_write` + `chunk_notify_store`. */
  async #storeChunk(n: number): Promise<void> {
    const buffer = this.chunks.bufferIndex(n);
    assert(buffer >= 0, `Queued chunk #${n} holds no buffer`);
    if (this.#errorCode !== 0 || this.#closed) {
      this.#finishStore(n, buffer, ChunkState.IN_MEMORY, ChunkState.FAILED);
      return;
    }
    const offset = await this.storage.allocate(this.geometry.chunkSectors);
    if (offset >= 0 && (this.#errorCode !== 0 || this.#closed)) {
      // corrupted or closed while waiting for the storage to grow
      this.#finishStore(n, buffer, ChunkState.IN_MEMORY, ChunkState.FAILED);
      return;
    }
    if (offset < 0) {
      this.#finishStore(n, buffer, ChunkState.IN_MEMORY, ChunkState.FAILED);
      this.setCorrupted(-ERRNO.ENOSPC);
      return;
    }
    this.chunks.transition(n, ChunkState.IN_MEMORY, ChunkState.STORING, offset);
    this.#notifyChunk(n);
    this.#wakeRoomWaiters();
    try {
      await this.storage.write(offset, this.buffers.view(buffer, this.#chunkBytes(n)));
    } catch (error) {
      this.#finishStore(n, buffer, ChunkState.STORING, ChunkState.FAILED);
      this.setCorrupted(-toBlksnapError(error, "store").errno);
      return;
    }
    this.#finishStore(n, buffer, ChunkState.STORING, ChunkState.STORED);
    this.stats.chunksStored++;
  }

  #finishStore(n: number, buffer: number, from: ChunkState, to: ChunkState): void {
    this.chunks.transition(n, from, to);
    this.buffers.release(buffer);
    this.#notifyChunk(n);
    this.#wakeRoomWaiters();
  }

  // --- image I/O -----------------------------------------------------------

  async #readPart(n: number, sector: number, out: Uint8Array): Promise<void> {
    for (;;) {
      this.#throwIfCorrupted();
      switch (this.chunks.state(n)) {
        case ChunkState.NOT_COPIED:
          await this.#ioOrEio(() => this.device.read(sector, out), "read of the original");
          if (!this.chunks.has(n)) return;
          // A copy-on-write started while we read: the original may have
          // changed under us, so read the saved copy instead.
          this.stats.rereads++;
          continue;
        case ChunkState.LOADING:
          await this.#chunkChanged(n);
          continue;
        case ChunkState.IN_MEMORY:
        case ChunkState.STORING: {
          const start = this.#offsetInChunkBytes(n, sector);
          out.set(
            this.buffers.view(this.chunks.bufferIndex(n)).subarray(start, start + out.length),
          );
          return;
        }
        case ChunkState.STORED: {
          const offset = this.chunks.diffOffsetSectors(n) + this.#offsetInChunkBytes(n, sector) /
              SECTOR_SIZE;
          await this.#ioOrEio(
            () => this.storage.read(offset, out),
            "read of the difference storage",
          );
          return;
        }
        case ChunkState.FAILED:
          throw this.#eio();
      }
    }
  }

  async #writePart(n: number, sector: number, data: Uint8Array): Promise<void> {
    for (;;) {
      this.#throwIfCorrupted();
      switch (this.chunks.state(n)) {
        case ChunkState.NOT_COPIED: {
          const buffer = await this.#reserve();
          if (buffer < 0) throw this.#closed ? this.#gone() : this.#eio();
          if (this.chunks.has(n)) {
            this.#unreserve(buffer);
            continue;
          }
          const offsetBytes = this.#offsetInChunkBytes(n, sector);
          if (!await this.#claimAndLoad(n, buffer, { offsetBytes, data })) throw this.#eio();
          return;
        }
        case ChunkState.LOADING:
        case ChunkState.STORING:
          await this.#chunkChanged(n);
          continue;
        case ChunkState.IN_MEMORY: {
          const view = this.buffers.view(this.chunks.bufferIndex(n));
          view.set(data, this.#offsetInChunkBytes(n, sector));
          return;
        }
        case ChunkState.STORED: {
          const offset = this.chunks.diffOffsetSectors(n) + this.#offsetInChunkBytes(n, sector) /
              SECTOR_SIZE;
          await this.#ioOrEio(
            () => this.storage.write(offset, data),
            "write to the difference storage",
          );
          return;
        }
        case ChunkState.FAILED:
          throw this.#eio();
      }
    }
  }

  async #forEachPart(
    sector: number,
    buf: Uint8Array,
    fn: (n: number, sector: number, part: Uint8Array) => Promise<void>,
  ): Promise<void> {
    const { chunkSectors } = this.geometry;
    const end = sector + buf.length / SECTOR_SIZE;
    const first = Math.floor(sector / chunkSectors);
    if (end <= (first + 1) * chunkSectors) {
      await fn(first, sector, buf);
      return;
    }
    const parts: Promise<void>[] = [];
    for (let s = sector; s < end;) {
      const n = Math.floor(s / chunkSectors);
      const partEnd = Math.min((n + 1) * chunkSectors, end);
      const from = (s - sector) * SECTOR_SIZE;
      parts.push(fn(n, s, buf.subarray(from, from + (partEnd - s) * SECTOR_SIZE)));
      s = partEnd;
    }
    await Promise.all(parts);
  }

  async #ioOrEio(io: () => Promise<void>, what: string): Promise<void> {
    try {
      await io();
    } catch (error) {
      throw new BlksnapError("EIO", `Snapshot image ${what} failed`, { cause: error });
    }
  }

  // --- helpers -------------------------------------------------------------

  #chunkChanged(n: number): Promise<void> {
    return new Promise((resolve) => {
      const waiters = this.#chunkWaiters.get(n);
      if (waiters === undefined) this.#chunkWaiters.set(n, [resolve]);
      else waiters.push(resolve);
    });
  }

  #notifyChunk(n: number): void {
    const waiters = this.#chunkWaiters.get(n);
    if (waiters === undefined) return;
    this.#chunkWaiters.delete(n);
    for (const wake of waiters) wake();
  }

  #leave(): void {
    assert(this.#active > 0, "Unbalanced diff area operation count");
    this.#active--;
    this.#wakeIdle();
  }

  #wakeIdle(): void {
    if (this.#active > 0 || this.#storing > 0 || this.#queue.length > 0) return;
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }

  #chunkBytes(n: number): number {
    const { chunkSectors } = this.geometry;
    const sectors = Math.min(chunkSectors, this.device.sizeSectors - n * chunkSectors);
    assert(sectors > 0, `Chunk #${n} is past the device end`);
    return sectors * SECTOR_SIZE;
  }

  #offsetInChunkBytes(n: number, sector: number): number {
    return (sector - n * this.geometry.chunkSectors) * SECTOR_SIZE;
  }

  #checkRange(sector: number, count: number): void {
    if (
      !Number.isSafeInteger(sector) || !Number.isSafeInteger(count) || sector < 0 || count < 0 ||
      sector + count > this.device.sizeSectors
    ) {
      throw new BlksnapError(
        "EINVAL",
        `Sector range ${sector}+${count} is outside the device of ${this.device.sizeSectors} sectors`,
      );
    }
  }

  #checkImageIo(sector: number, buf: Uint8Array): void {
    if (this.#closed) throw this.#gone();
    assertSectorBuffer(buf);
    this.#checkRange(sector, buf.length / SECTOR_SIZE);
    this.#throwIfCorrupted();
  }

  #throwIfCorrupted(): void {
    if (this.#errorCode !== 0) throw this.#eio();
  }

  #gone(): BlksnapError {
    return new BlksnapError("ENODEV", "The snapshot image is gone");
  }

  #eio(): BlksnapError {
    return new BlksnapError(
      "EIO",
      `The snapshot image is corrupted (error ${this.#errorCode})`,
    );
  }
}
