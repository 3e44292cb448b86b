/**
 * The control block of one tracked device: the words every worker of the
 * device and the daemon's main thread share, made when the device is
 * attached and handed to each worker when it starts (a queue worker blocks
 * in io_uring and never reads a message again, so nothing here is replaced
 * later: a take or destroy changes words and bumps the epoch).
 *
 * ## The write gate (a take or destroy switching every device at one instant)
 *
 * A queue admits a write with `admit()`: it adds itself to ADMITTED, then
 * reads GATE; if the gate is closed it takes itself back out and parks the
 * request. The main thread closes the gate, then waits for ADMITTED to drain
 * to zero. Both sides use sequentially consistent atomics, so either the
 * queue sees the gate closed, or the main thread sees its count: no write
 * straddles the switch. `finish()` ends an admitted write (after the original
 * completed it). Whoever opens the gate must wake every queue.
 *
 * ## Snapshot words
 *
 * While a snapshot is taken, COW_ACTIVE is 1 and the geometry, pool and
 * storage words describe it; EPOCH advances at every take and destroy so
 * that workers re-make their views. ERROR is 0, or the negative errno that
 * corrupted this device's part of the snapshot (then copy-on-write stops and
 * image I/O fails with EIO). WAITERS counts requests parked on a chunk or a
 * buffer across all queues: whoever makes progress wakes the queues only
 * when it is non-zero.
 *
 * @module
 */
import { assert, unreachable } from "../assert.ts";

export const MAX_QUEUES = 16;

/** Int32 word indexes. */
export const CTL = {
  GATE: 0,
  ADMITTED: 1,
  COW_ACTIVE: 2,
  EPOCH: 3,
  ERROR: 4,
  WAITERS: 5,
  CHUNK_SHIFT: 6,
  CHUNK_COUNT: 7,
  POOL_COUNT: 8,
  BUFFER_BYTES: 9,
  /** The storage fd of the current take (status and debugging). */
  STORAGE_FD: 10,
  STORE_EFD: 11,
  /** Storage offsets are kept in units of 2^UNIT_SHIFT sectors. */
  UNIT_SHIFT: 12,
  /** Bumped (and notified) when the store worker has news for the main thread. */
  EVENTS: 13,
  QUEUES: 14,
  IMAGE_QUEUES: 15,
  /** Counters of the current take, bumped atomically by any queue (status). */
  COW_LOADS: 16,
  /** Requests that had to wait (for a chunk another queue loads, or a buffer). */
  PARKED: 17,
  IMAGE_READS: 18,
  IMAGE_WRITES: 19,
  /** eventfds of the tracked device's queues, then of the image's. */
  QUEUE_EFD: 24,
  IMAGE_EFD: 24 + MAX_QUEUES,
  WORDS: 24 + 2 * MAX_QUEUES,
} as const;

/** Float64 slots after the Int32 words. */
export const CTL_F = {
  POOL_ADDRESS: 0,
  /** Chunks written to the storage (the store worker's). */
  STORED: 1,
  /** Sectors of the storage holding this device's chunks (the store worker's). */
  FILLED_SECTORS: 2,
  SLOTS: 4,
} as const;

const FLOAT_OFFSET = CTL.WORDS * 4;

export function deviceCtlBytes(): number {
  return FLOAT_OFFSET + CTL_F.SLOTS * 8;
}

export class DeviceCtl {
  readonly shared: SharedArrayBuffer;
  readonly w: Int32Array;
  readonly f: Float64Array;

  constructor(shared: SharedArrayBuffer) {
    assert(shared.byteLength >= deviceCtlBytes(), "device control block too small");
    this.shared = shared;
    this.w = new Int32Array(shared, 0, CTL.WORDS);
    this.f = new Float64Array(shared, FLOAT_OFFSET, CTL_F.SLOTS);
  }

  static create(): DeviceCtl {
    const ctl = new DeviceCtl(new SharedArrayBuffer(deviceCtlBytes()));
    for (let i = 0; i < 2 * MAX_QUEUES; i++) ctl.w[CTL.QUEUE_EFD + i] = -1;
    ctl.w[CTL.STORAGE_FD] = -1;
    ctl.w[CTL.STORE_EFD] = -1;
    return ctl;
  }

  // ---- queue side ----

  /** Admits a write; false while the gate is closed (park it and retry when woken). */
  admit(): boolean {
    const w = this.w;
    Atomics.add(w, CTL.ADMITTED, 1);
    if (Atomics.load(w, CTL.GATE) === 0) return true;
    this.finish();
    return false;
  }

  /** Ends an admitted write. */
  finish(): void {
    const left = Atomics.sub(this.w, CTL.ADMITTED, 1) - 1;
    if (left < 0) unreachable("more writes finished than admitted");
    // Only a closing gate has a waiter (and it re-checks every 50 ms anyway).
    if (left === 0 && Atomics.load(this.w, CTL.GATE) !== 0) Atomics.notify(this.w, CTL.ADMITTED);
  }

  get cowActive(): boolean {
    return Atomics.load(this.w, CTL.COW_ACTIVE) !== 0;
  }
  get epoch(): number {
    return Atomics.load(this.w, CTL.EPOCH);
  }
  get error(): number {
    return Atomics.load(this.w, CTL.ERROR);
  }

  /**
   * Marks this device's part of the snapshot corrupted with `-errno` (the
   * first error wins) and stops copy-on-write. Returns whether this call
   * set it.
   */
  corrupt(negErrno: number): boolean {
    assert(negErrno < 0, "corrupt() takes a negative errno");
    const won = Atomics.compareExchange(this.w, CTL.ERROR, 0, negErrno) === 0;
    Atomics.store(this.w, CTL.COW_ACTIVE, 0);
    this.bumpEvents();
    return won;
  }

  bumpEvents(): void {
    Atomics.add(this.w, CTL.EVENTS, 1);
    Atomics.notify(this.w, CTL.EVENTS);
  }

  addParked(delta: number): void {
    Atomics.add(this.w, CTL.WAITERS, delta);
  }

  get waiters(): number {
    return Atomics.load(this.w, CTL.WAITERS);
  }

  // ---- main-thread side ----

  closeGate(): void {
    Atomics.store(this.w, CTL.GATE, 1);
  }

  openGate(): void {
    Atomics.store(this.w, CTL.GATE, 0);
  }

  get admitted(): number {
    return Atomics.load(this.w, CTL.ADMITTED);
  }

  /** Resolves once no admitted write is left, or false after `timeoutMs`. */
  async drained(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const n = Atomics.load(this.w, CTL.ADMITTED);
      if (n === 0) return true;
      const left = deadline - Date.now();
      if (left <= 0) return false;
      const waitMs = Math.min(left, 50);
      const r = Atomics.waitAsync(this.w, CTL.ADMITTED, n, waitMs);
      if (!r.async) continue;
      // Deno's event loop does not count a pending waitAsync: without a timer
      // it may end with this promise unresolved.
      const keepAlive = setTimeout(() => {}, waitMs + 1);
      await r.value;
      clearTimeout(keepAlive);
    }
  }

  /** The eventfds to wake every queue of the device (tracked and image). */
  queueEventFds(): number[] {
    const out: number[] = [];
    const w = this.w;
    for (let i = 0; i < w[CTL.QUEUES]!; i++) out.push(w[CTL.QUEUE_EFD + i]!);
    for (let i = 0; i < w[CTL.IMAGE_QUEUES]!; i++) out.push(w[CTL.IMAGE_EFD + i]!);
    return out.filter((fd) => fd >= 0);
  }

  /** The pool's C address (a number) or 0. */
  get poolAddress(): number {
    return this.f[CTL_F.POOL_ADDRESS]!;
  }

  /** Adds to one of the Int32 counters (COW_LOADS, PARKED, IMAGE_READS, IMAGE_WRITES). */
  count(word: number, by = 1): void {
    Atomics.add(this.w, word, by);
  }

  /** Zeroes the counters of a take. */
  resetCounters(): void {
    for (const word of [CTL.COW_LOADS, CTL.PARKED, CTL.IMAGE_READS, CTL.IMAGE_WRITES]) {
      Atomics.store(this.w, word, 0);
    }
    this.f[CTL_F.STORED] = 0;
    this.f[CTL_F.FILLED_SECTORS] = 0;
  }
}
