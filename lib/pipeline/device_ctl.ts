/**
 * The control block of one tracked device: the words every worker of the
 * device and the daemon's main thread share, made when the device is
 * attached and handed to each worker when it starts (a queue worker blocks
 * in io_uring and never reads a message again, so nothing here is replaced
 * later: a take or destroy changes words and bumps the epoch).
 *
 * ## The write gate (a take or destroy switching every device at one instant)
 *
 * A queue admits a write with `admit(lane)`: it raises its lane's count of
 * admitted writes, then reads GATE; if the gate is closed it takes the write
 * back out and parks the request. The main thread closes the gate, then waits
 * for every lane to drain to zero. Both sides use sequentially consistent
 * atomics (a store, then a load of the other side's word), so either the
 * queue sees the gate closed, or the main thread sees its count: no write
 * straddles the switch. `finish(lane)` ends an admitted write (after the
 * original completed it). Whoever opens the gate must wake every queue.
 *
 * Each lane (one per queue worker: a lane has exactly one writer) is a word
 * on a cache line of its own, and the writer keeps its count in a plain
 * store: a write costs two atomic stores and a load, no read-modify-write,
 * and queues never bounce a cache line between them (measured under TCG:
 * one shared counter made every write of one queue a miss for the other).
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
/**
 * Lanes: one per queue worker, each on a cache line of its own with only that
 * worker writing it: tracked queue q is lane q, image queue q lane
 * MAX_QUEUES + q (see imageLane). Tests may use any lane below LANES.
 */
export const LANES = 2 * MAX_QUEUES;
/** Int32 words between two lanes: 64 bytes, one cache line each. */
const LANE_STRIDE = 16;

/** The words of a lane. */
export const LANE = {
  /** Writes admitted through the gate and not finished (tracked queues). */
  ADMITTED: 0,
  /** Counters of the current take (status), zeroed when a take is armed: */
  /** chunks copied on write; */
  COW_LOADS: 1,
  /** requests that had to wait (for a chunk another queue loads, or a buffer); */
  PARKED: 2,
  /** image reads and writes. */
  IMAGE_READS: 3,
  IMAGE_WRITES: 4,
} as const;

/** The index in `w` of word `field` of `lane`. */
function laneWord(lane: number, field: number): number {
  return CTL.LANES + lane * LANE_STRIDE + field;
}

/** The lane of image queue `qId`. */
export function imageLane(qId: number): number {
  return MAX_QUEUES + qId;
}

/** Int32 word indexes. */
export const CTL = {
  GATE: 0,
  // word 1: unused (admitted writes are counted per lane, see LANES)
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
  // words 16-19: unused (the take's counters are per lane, see LANE)
  /** eventfds of the tracked device's queues, then of the image's. */
  QUEUE_EFD: 24,
  IMAGE_EFD: 24 + MAX_QUEUES,
  /** The lanes, LANE_STRIDE words apart (64-byte aligned). */
  LANES: 64,
  WORDS: 64 + LANES * LANE_STRIDE,
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

  /**
   * Admits a write of `lane` (the queue's id; one thread per lane); false
   * while the gate is closed (park it and retry when woken).
   */
  admit(lane: number): boolean {
    const w = this.w;
    const word = laneWord(lane, LANE.ADMITTED);
    const n = w[word]! + 1; // this lane's own word: only this thread writes it
    Atomics.store(w, word, n);
    if (Atomics.load(w, CTL.GATE) === 0) return true;
    this.#leave(word, n - 1);
    return false;
  }

  /** Ends an admitted write of `lane`. */
  finish(lane: number): void {
    const word = laneWord(lane, LANE.ADMITTED);
    const left = this.w[word]! - 1;
    if (left < 0) unreachable("more writes finished than admitted");
    this.#leave(word, left);
  }

  #leave(word: number, left: number): void {
    const w = this.w;
    Atomics.store(w, word, left);
    // Only a closing gate has a waiter (and it re-checks every 50 ms anyway).
    if (left === 0 && Atomics.load(w, CTL.GATE) !== 0) Atomics.notify(w, word);
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

  /** Writes admitted and not finished, over every lane. */
  get admitted(): number {
    return this.counter(LANE.ADMITTED);
  }

  /** Resolves once no admitted write is left, or false after `timeoutMs`. */
  async drained(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (let lane = 0; lane < LANES; lane++) {
      const word = laneWord(lane, LANE.ADMITTED);
      for (;;) {
        const n = Atomics.load(this.w, word);
        if (n === 0) break;
        const left = deadline - Date.now();
        if (left <= 0) return false;
        const waitMs = Math.min(left, 50);
        const r = Atomics.waitAsync(this.w, word, n, waitMs);
        if (!r.async) continue;
        // Deno's event loop does not count a pending waitAsync: without a timer
        // it may end with this promise unresolved.
        const keepAlive = setTimeout(() => {}, waitMs + 1);
        await r.value;
        clearTimeout(keepAlive);
      }
    }
    // A lane seen empty after the gate closed admits no more: its admit() sees the gate.
    return true;
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

  /**
   * Adds to a counter of `lane` (LANE.COW_LOADS, PARKED, IMAGE_READS,
   * IMAGE_WRITES). Only the lane's own worker calls this: a plain add to its
   * own cache line, never a read-modify-write shared between queues.
   */
  count(lane: number, field: number, by = 1): void {
    const i = laneWord(lane, field);
    Atomics.store(this.w, i, this.w[i]! + by);
  }

  /** A lane word summed over every lane (status). */
  counter(field: number): number {
    let n = 0;
    for (let lane = 0; lane < LANES; lane++) {
      n += Atomics.load(this.w, laneWord(lane, field));
    }
    return n;
  }

  /** Zeroes the counters of a take (with the gate closed and drained: no lane is counting). */
  resetCounters(): void {
    for (let lane = 0; lane < LANES; lane++) {
      for (const field of [LANE.COW_LOADS, LANE.PARKED, LANE.IMAGE_READS, LANE.IMAGE_WRITES]) {
        Atomics.store(this.w, laneWord(lane, field), 0);
      }
    }
    this.f[CTL_F.STORED] = 0;
    this.f[CTL_F.FILLED_SECTORS] = 0;
  }
}
