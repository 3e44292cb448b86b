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
 * or waiting to be stored). When either is exhausted the claimer waits until
 * the storer frees room: memory never grows past the bounds. Waiters are
 * served in arrival order, and room is handed to them one by one as it
 * frees (a buffer released, a chunk taken off the queue), so an event wakes
 * only whom it can serve. The storer writes up to
 * {@linkcode STORE_CONCURRENCY} chunks at once and starts as soon as a chunk
 * is queued.
 *
 * ## The stall watchdog
 *
 * Those bounds are hard, so a difference storage that hangs (a dead NFS
 * server, a stuck disk) would stall writes to the original for ever, against
 * invariant 3. When writers have waited for room for `cow_stall_timeout_ms`
 * (see `params.ts`) with no progress at all — no chunk stored, no growth of
 * the storage finished — the area is corrupted: -ENOSPC when a store is
 * waiting for the storage to grow, -EIO otherwise. That releases every
 * waiter and turns copy-on-write off, so writes go through. The storage has
 * its own watchdog for an allocation that waits for a growth (-ENOSPC).
 * Stores still hung keep their buffers until they end; `close()` waits for
 * them, as the kernel would wait for its bios.
 *
 * ## Image I/O
 *
 * A read of a NOT_COPIED chunk goes to the original; when it completes the
 * chunk is looked up again, and if a copy-on-write claimed it meanwhile the
 * original may have been overwritten during the read, so the read is redone
 * from the copy (invariant 2). IN_MEMORY and STORING chunks are read from the
 * buffer, STORED ones from the difference storage. A write to the image
 * copies the chunk first (like a copy-on-write) and then changes the copy.
 * An I/O that spans chunks runs one part per chunk, concurrently; it ends —
 * with the first error, if any — only once every part has ended, so nothing
 * writes into the caller's buffer or holds a claim after it.
 *
 * ## Failure
 *
 * A failure of the machinery (no space, an I/O error while copying or
 * storing, a stall) marks the area corrupted with a negative errno and
 * raises a `corrupted` event. From then on copy-on-write is dropped — writes
 * to the original go through untouched and never wait — and image I/O fails
 * with EIO (invariant 3). Callbacks are isolated: one that throws is
 * reported to the log and otherwise ignored. Background work (the storer)
 * never rejects unobserved: an unexpected error corrupts the area.
 *
 * All of it runs on one JS thread; every await is a point where other
 * operations interleave, so a chunk's state is looked up again after each.
 *
 * @module
 */

import { Watchdog } from "./watchdog.ts";
import { assertSectorBuffer, type BlockDevice, SECTOR_SIZE } from "./block_device.ts";
import { type ChunkGeometry, chunkGeometry, ChunkState, ChunkTable } from "./chunk.ts";
import { DiffBufferPool } from "./diff_buffer.ts";
import type { DiffStorage } from "./diff_storage.ts";
import { assert, AssertionError, BlksnapError, ERRNO, toBlksnapError } from "./errors.ts";
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
  /** Receives diagnostics: stalls, a callback that threw, unexpected errors. */
  readonly log?: (message: string) => void;
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

/** A FIFO of waiters: O(1) at both ends, no reallocation in steady state. */
class WaiterQueue<T> {
  #items: (T | undefined)[] = [];
  #head = 0;

  get length(): number {
    return this.#items.length - this.#head;
  }
  push(item: T): void {
    this.#items.push(item);
  }
  shift(): T {
    assert(this.length > 0, "Waiter queue underflow");
    const item = this.#items[this.#head]!;
    this.#items[this.#head++] = undefined;
    if (this.#head === this.#items.length) {
      this.#items.length = 0;
      this.#head = 0;
    }
    return item;
  }
}

/** Resolves a claimer's wait with a reserved buffer, or -1 when copy-on-write is off. */
type RoomWaiter = (buffer: number) => void;

/**
 * Awaits every promise, then throws the first failure (an assertion before
 * anything else): nothing may still be running when the caller goes on.
 */
async function settleAll(parts: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(parts);
  let failure: PromiseRejectedResult | undefined;
  for (const result of results) {
    if (result.status === "fulfilled") continue;
    if (result.reason instanceof AssertionError) throw result.reason;
    failure ??= result;
  }
  if (failure !== undefined) throw failure.reason;
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
  readonly #stallTimeoutMs: number;
  readonly #onCorrupted: (errorCode: number) => void;
  readonly #log: (message: string) => void;
  readonly #queue: ChunkRing;
  /** Claims holding a queue slot while their chunk loads. */
  #slotsReserved = 0;
  #storing = 0;
  /** Stores waiting for an extent of the storage. */
  #allocating = 0;
  #active = 0;
  #errorCode = 0;
  #closed = false;
  #backgroundError: unknown = null;
  readonly #chunkWaiters = new Map<number, (() => void)[]>();
  readonly #roomWaiters = new WaiterQueue<RoomWaiter>();
  #idleWaiters: (() => void)[] = [];
  /** When the last store ended (performance.now()). */
  #lastStoreMs = 0;
  /** When the writers now waiting for room began to wait. */
  #roomWaitSinceMs = 0;
  readonly #watchdog = new Watchdog(() => this.#checkStall());
  readonly #onStored = () => this.#storerDone(null);
  readonly #onStoreFailed = (error: unknown) => this.#storerDone(error);

  constructor(options: DiffAreaOptions) {
    const { device, storage, params } = options;
    this.device = device;
    this.storage = storage;
    this.geometry = chunkGeometry(
      device.sizeSectors,
      params,
      device.minIoBytes ?? device.logicalBlockSize,
    );
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
    this.#stallTimeoutMs = params.cowStallTimeoutMs;
    this.#queue = new ChunkRing(params.chunkMaximumInQueue);
    this.#onCorrupted = options.onCorrupted ?? (() => {});
    this.#log = options.log ?? (() => {});
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
  /** Claimers waiting for a buffer or room in the store queue. */
  get roomWaiters(): number {
    return this.#roomWaiters.length;
  }
  /** The first unexpected error of background work (it corrupted the area), or null. */
  get backgroundError(): unknown {
    return this.#backgroundError;
  }
  /** Bytes of shared memory held (chunk table and buffers). */
  get byteLength(): number {
    return this.chunks.byteLength + this.buffers.byteLength;
  }

  /**
   * `diff_area_set_corrupted`: the first error wins. Drops copy-on-write,
   * releases every waiter, then raises the event.
   */
  setCorrupted(errorCode: number): void {
    assert(errorCode < 0, `An error code is a negative errno, not ${errorCode}`);
    if (this.#errorCode !== 0) return;
    this.#errorCode = errorCode;
    this.#releaseRoomWaiters();
    this.#wakeAllChunkWaiters();
    this.#kickStorer();
    try {
      this.#onCorrupted(errorCode);
    } catch (error) {
      this.#say(`The corruption callback failed: ${messageOf(error)}`);
    }
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
        await settleAll(copies);
      }
    } finally {
      this.#leave();
    }
  }

  /**
   * Reads the snapshot image at `sector` into `buf`. When it rejects,
   * nothing of it is still running: every part has ended.
   */
  async readImage(sector: number, buf: Uint8Array): Promise<void> {
    this.#checkImageIo(sector, buf);
    this.#active++;
    try {
      await this.#forEachPart(sector, buf, false);
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
      await this.#forEachPart(sector, buf, true);
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
    this.#releaseRoomWaiters();
    this.#kickStorer();
    await this.settled();
    this.#watchdog.stop();
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
      if (this.chunks.has(n) || this.#errorCode !== 0 || this.#closed) {
        this.#unreserve(buffer); // claimed by another, or copy-on-write went off meanwhile
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
    const bytes = this.#chunkBytes(n);
    const view = this.buffers.view(buffer, bytes);
    const whole = overwrite !== null && overwrite.offsetBytes === 0 &&
      overwrite.data.length === bytes;
    if (!whole) {
      try {
        await this.device.read(n * this.geometry.chunkSectors, view);
      } catch (error) {
        if (error instanceof AssertionError) throw error;
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

  /**
   * A free buffer and a queue slot, at once when there is room and nobody
   * waits, else in turn; -1 when copy-on-write is off.
   */
  #reserve(): Promise<number> {
    if (this.#errorCode !== 0 || this.#closed) return Promise.resolve(-1);
    if (this.#roomWaiters.length === 0 && this.#hasRoom()) {
      return Promise.resolve(this.#takeRoom());
    }
    this.stats.backPressureWaits++;
    if (this.#roomWaiters.length === 0) {
      this.#roomWaitSinceMs = performance.now();
      this.#watchdog.arm(this.#stallTimeoutMs);
    }
    return new Promise((resolve) => this.#roomWaiters.push(resolve));
  }

  #hasRoom(): boolean {
    return this.buffers.available > 0 &&
      this.#queue.length + this.#slotsReserved < this.#maximumInQueue;
  }

  #takeRoom(): number {
    const buffer = this.buffers.take();
    assert(buffer >= 0, "The pool had a buffer available");
    this.#slotsReserved++;
    if (this.buffers.inUse > this.stats.buffersInUsePeak) {
      this.stats.buffersInUsePeak = this.buffers.inUse;
    }
    return buffer;
  }

  /** Hands the room there is to the waiters, oldest first. Call whenever room frees. */
  #grantRoom(): void {
    if (this.#roomWaiters.length === 0) return;
    if (this.#errorCode !== 0 || this.#closed) {
      this.#releaseRoomWaiters();
      return;
    }
    while (this.#roomWaiters.length > 0 && this.#hasRoom()) {
      this.#roomWaiters.shift()(this.#takeRoom());
    }
    if (this.#roomWaiters.length === 0) this.#watchdog.stop();
    else this.#roomWaitSinceMs = performance.now(); // someone was served: progress
  }

  /** Copy-on-write is off: every waiter goes on without a buffer. */
  #releaseRoomWaiters(): void {
    while (this.#roomWaiters.length > 0) this.#roomWaiters.shift()(-1);
    this.#watchdog.stop();
  }

  #unreserve(buffer: number): void {
    assert(this.#slotsReserved > 0, "Queue slot released twice");
    this.#slotsReserved--;
    this.buffers.release(buffer);
    this.#grantRoom();
  }

  // --- the stall watchdog --------------------------------------------------

  /** Writers wait for room: corrupt the area when nothing moved for the timeout. */
  #checkStall(): void {
    if (this.#roomWaiters.length === 0 || this.#errorCode !== 0 || this.#closed) return;
    const lastProgressMs = Math.max(
      this.#roomWaitSinceMs,
      this.#lastStoreMs,
      this.storage.lastGrowthMs,
    );
    const idleMs = performance.now() - lastProgressMs;
    if (idleMs < this.#stallTimeoutMs) {
      this.#watchdog.arm(this.#stallTimeoutMs - idleMs);
      return;
    }
    const growth = this.#allocating > 0;
    this.#say(
      `Copy-on-write of "${this.device.deviceId}" stalled for ${Math.round(idleMs)} ms ` +
        `waiting for ${growth ? "the difference storage to grow" : "stores to complete"}: ` +
        `the snapshot is corrupted so that writes go on`,
    );
    this.setCorrupted(growth ? -ERRNO.ENOSPC : -ERRNO.EIO);
  }

  // --- store queue ---------------------------------------------------------

  #kickStorer(): void {
    let taken = false;
    while (this.#queue.length > 0 && this.#storing < STORE_CONCURRENCY) {
      const n = this.#queue.shift();
      taken = true;
      this.#storing++;
      this.#storeChunk(n).then(this.#onStored, this.#onStoreFailed);
    }
    if (taken) this.#grantRoom(); // queue slots freed
  }

  /** The end of one store, whatever happened: never throws, never rejects. */
  #storerDone(error: unknown): void {
    try {
      this.#storing--;
      this.#lastStoreMs = performance.now();
      if (error !== null) {
        this.#backgroundError ??= error;
        this.#say(`Storing a chunk of "${this.device.deviceId}" failed: ${messageOf(error)}`);
        this.setCorrupted(
          error instanceof BlksnapError ? -error.errno : -ERRNO.EIO,
        );
      }
      this.#kickStorer();
      this.#wakeIdle();
    } catch (failure) {
      this.#backgroundError ??= failure;
      this.#say(`The storer of "${this.device.deviceId}" failed: ${messageOf(failure)}`);
    }
  }

  /**
   * `diff_area_store_one` + `chunk_diff_write` + `chunk_notify_store`. Every
   * failure of the storage ends the chunk FAILED and corrupts the area; only
   * a bug (an assertion) rejects.
   */
  async #storeChunk(n: number): Promise<void> {
    const buffer = this.chunks.bufferIndex(n);
    assert(buffer >= 0, `Queued chunk #${n} holds no buffer`);
    let state: ChunkState = ChunkState.IN_MEMORY;
    try {
      if (this.#errorCode !== 0 || this.#closed) {
        this.#finishStore(n, buffer, state, ChunkState.FAILED);
        return;
      }
      let offset: number;
      this.#allocating++;
      try {
        offset = await this.storage.allocate(this.geometry.chunkSectors);
      } finally {
        this.#allocating--;
      }
      if (offset < 0) {
        this.#finishStore(n, buffer, state, ChunkState.FAILED);
        this.setCorrupted(-ERRNO.ENOSPC);
        return;
      }
      if (this.#errorCode !== 0 || this.#closed) {
        // corrupted or closed while waiting for the storage to grow
        this.#finishStore(n, buffer, state, ChunkState.FAILED);
        return;
      }
      this.chunks.transition(n, state, ChunkState.STORING, offset);
      state = ChunkState.STORING;
      this.#notifyChunk(n);
      await this.storage.write(offset, this.buffers.view(buffer, this.#chunkBytes(n)));
    } catch (error) {
      if (error instanceof AssertionError) throw error;
      this.#finishStore(n, buffer, state, ChunkState.FAILED);
      this.setCorrupted(-toBlksnapError(error, "store").errno);
      return;
    }
    this.#finishStore(n, buffer, state, ChunkState.STORED);
    this.stats.chunksStored++;
  }

  #finishStore(n: number, buffer: number, from: ChunkState, to: ChunkState): void {
    this.chunks.transition(n, from, to);
    this.buffers.release(buffer);
    this.#notifyChunk(n);
    this.#grantRoom();
  }

  // --- image I/O -----------------------------------------------------------

  async #readPart(n: number, sector: number, out: Uint8Array): Promise<void> {
    for (;;) {
      this.#throwIfCorrupted();
      const slot = this.chunks.find(n);
      switch (this.chunks.stateAt(slot)) {
        case ChunkState.NOT_COPIED:
          try {
            await this.device.read(sector, out);
          } catch (error) {
            throw this.#ioError(error, "read of the original");
          }
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
          const view = this.buffers.view(this.chunks.bufferAt(slot));
          out.set(view.subarray(start, start + out.length));
          return;
        }
        case ChunkState.STORED: {
          const offset = this.chunks.diffOffsetAt(slot) +
            this.#offsetInChunkBytes(n, sector) / SECTOR_SIZE;
          try {
            await this.storage.read(offset, out);
          } catch (error) {
            throw this.#ioError(error, "read of the difference storage");
          }
          return;
        }
        case ChunkState.FAILED:
          throw this.#failed();
      }
    }
  }

  async #writePart(n: number, sector: number, data: Uint8Array): Promise<void> {
    for (;;) {
      this.#throwIfCorrupted();
      const slot = this.chunks.find(n);
      switch (this.chunks.stateAt(slot)) {
        case ChunkState.NOT_COPIED: {
          const buffer = await this.#reserve();
          if (buffer < 0) throw this.#closed ? this.#gone() : this.#eio();
          if (this.chunks.has(n) || this.#errorCode !== 0 || this.#closed) {
            this.#unreserve(buffer);
            if (this.#closed) throw this.#gone();
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
          const view = this.buffers.view(this.chunks.bufferAt(slot));
          view.set(data, this.#offsetInChunkBytes(n, sector));
          return;
        }
        case ChunkState.STORED: {
          const offset = this.chunks.diffOffsetAt(slot) +
            this.#offsetInChunkBytes(n, sector) / SECTOR_SIZE;
          try {
            await this.storage.write(offset, data);
          } catch (error) {
            throw this.#ioError(error, "write to the difference storage");
          }
          return;
        }
        case ChunkState.FAILED:
          throw this.#failed();
      }
    }
  }

  /**
   * Runs the read or write of each chunk-sized part of `buf`. Parts run
   * concurrently; the first failure is thrown once every part has ended, so
   * that none still writes into the caller's buffer or holds a claim.
   */
  async #forEachPart(sector: number, buf: Uint8Array, write: boolean): Promise<void> {
    const { chunkSectors } = this.geometry;
    const end = sector + buf.length / SECTOR_SIZE;
    const first = Math.floor(sector / chunkSectors);
    if (end <= (first + 1) * chunkSectors) {
      await (write ? this.#writePart(first, sector, buf) : this.#readPart(first, sector, buf));
      return;
    }
    const parts: Promise<void>[] = [];
    for (let s = sector; s < end;) {
      const n = Math.floor(s / chunkSectors);
      const partEnd = Math.min((n + 1) * chunkSectors, end);
      const from = (s - sector) * SECTOR_SIZE;
      const part = buf.subarray(from, from + (partEnd - s) * SECTOR_SIZE);
      parts.push(write ? this.#writePart(n, s, part) : this.#readPart(n, s, part));
      s = partEnd;
    }
    await settleAll(parts);
  }

  /** An I/O error of the image as EIO; an assertion stays what it is (a bug). */
  #ioError(error: unknown, what: string): Error {
    if (error instanceof AssertionError) return error;
    return new BlksnapError("EIO", `Snapshot image ${what} failed`, { cause: error });
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

  /** On corruption: whoever waits for a chunk looks again (and gives up). */
  #wakeAllChunkWaiters(): void {
    for (const n of [...this.#chunkWaiters.keys()]) this.#notifyChunk(n);
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

  /** Logs; a log that throws is dropped. */
  #say(message: string): void {
    try {
      this.#log(message);
    } catch {
      // nowhere left to report it
    }
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

  /** A FAILED chunk: the area is corrupted, or was closed while the chunk waited. */
  #failed(): BlksnapError {
    return this.#errorCode === 0 && this.#closed ? this.#gone() : this.#eio();
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

function messageOf(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
