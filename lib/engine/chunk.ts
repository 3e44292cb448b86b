/**
 * Chunks: the unit of copy-on-write (the module's `chunk`), and the table
 * of their states, kept in a SharedArrayBuffer for touched chunks only.
 *
 * ## The chunk state machine
 *
 * A chunk that the snapshot never touched has no record: it is NOT_COPIED,
 * and the image reads it from the original. A record is made when a
 * copy-on-write (or a write to the image) claims the chunk.
 *
 * ```
 *  NOT_COPIED ──claim──▶ LOADING ──loaded──▶ IN_MEMORY ──extent──▶ STORING ──written──▶ STORED
 *  (no record)              │                   │                    │
 *                           └──────────────────┴────────────────────┴──────▶ FAILED
 *                          read of the       corrupted or no       write to the
 *                          original failed   space at store        storage failed
 * ```
 *
 * | from       | to        | who                                             |
 * |------------|-----------|-------------------------------------------------|
 * | NOT_COPIED | LOADING   | the COW of a write, or a write to the image     |
 * | LOADING    | IN_MEMORY | the same, once the original's data is in a buffer |
 * | LOADING    | FAILED    | the same, when reading the original failed      |
 * | IN_MEMORY  | STORING   | the storer, with an extent allocated            |
 * | IN_MEMORY  | FAILED    | the storer, when the snapshot is corrupted or there is no space |
 * | STORING    | STORED    | the storer, when the write completed            |
 * | STORING    | FAILED    | the storer, when the write failed               |
 *
 * Nothing else is legal; {@linkcode ChunkTable.transition} asserts it.
 * LOADING, IN_MEMORY and STORING hold a buffer of the pool; STORED and FAILED
 * hold none. A chunk never leaves STORED or FAILED. Waiters (a second writer
 * of a chunk being loaded, an image read, an image write during STORING)
 * wait for the chunk's next transition.
 *
 * ## Shared layout
 *
 * One growable SharedArrayBuffer: a 64-byte header, then an open-addressing
 * hash table (linear probing, no deletion) of 32-byte records. Int32 words,
 * little-endian, accessed with Atomics:
 *
 * | header word | field                                                 |
 * |------------:|-------------------------------------------------------|
 * |           0 | capacity in slots (a power of 2)                      |
 * |           1 | number of records                                     |
 * |           2 | rehash lock: odd while the table is being rehashed    |
 * |           3 | maximum number of records (bound from the limits)     |
 *
 * | record word | field                                                 |
 * |------------:|-------------------------------------------------------|
 * |           0 | state ({@linkcode ChunkState}); 0 = empty slot        |
 * |           1 | chunk number, low 32 bits                             |
 * |           2 | chunk number, high bits                               |
 * |           3 | buffer index in the pool, -1 when none                |
 * |           4 | offset in the difference storage (sectors), low 32 bits |
 * |           5 | offset in the difference storage, high bits, -1 if none |
 * |           6 | transition counter (+1 at each transition; Atomics.notify) |
 * |           7 | reserved                                              |
 *
 * Slot of chunk n: probe from `hash(n) & (capacity - 1)`. The table grows
 * (buffer grown in place, records rehashed) when it is half full; another
 * worker reads the rehash lock before and after a lookup and retries when
 * it changed or is odd. Records are written before their state is published.
 *
 * @module
 */

import { SECTOR_SHIFT, SECTOR_SIZE } from "./block_device.ts";
import { assert, BlksnapError } from "./errors.ts";
import type { Params } from "./params.ts";

/** States of a chunk; see the module documentation for the legal moves. */
export const ChunkState = {
  NOT_COPIED: 0,
  LOADING: 1,
  IN_MEMORY: 2,
  STORING: 3,
  STORED: 4,
  FAILED: 5,
} as const;
export type ChunkState = typeof ChunkState[keyof typeof ChunkState];

const STATE_NAMES = ["NOT_COPIED", "LOADING", "IN_MEMORY", "STORING", "STORED", "FAILED"];

/** Name of a state, for messages. */
export function chunkStateName(state: number): string {
  return STATE_NAMES[state] ?? `state#${state}`;
}

/** Legal transitions, `from * 8 + to`. */
const LEGAL = new Set<number>([
  ChunkState.LOADING * 8 + ChunkState.IN_MEMORY,
  ChunkState.LOADING * 8 + ChunkState.FAILED,
  ChunkState.IN_MEMORY * 8 + ChunkState.STORING,
  ChunkState.IN_MEMORY * 8 + ChunkState.FAILED,
  ChunkState.STORING * 8 + ChunkState.STORED,
  ChunkState.STORING * 8 + ChunkState.FAILED,
]);

/** Whether a transition is allowed by the state machine. */
export function isLegalTransition(from: ChunkState, to: ChunkState): boolean {
  return LEGAL.has(from * 8 + to);
}

/** Geometry of the chunks of one device (`diff_area_calculate_chunk_size`). */
export interface ChunkGeometry {
  readonly chunkShift: number;
  readonly chunkSectors: number;
  readonly chunkCount: number;
}

/**
 * Chooses the chunk size as `diff_area_calculate_chunk_size` does: start at
 * the minimum shift and grow while there would be more than
 * 2^chunkMaximumCountShift chunks or a chunk would be smaller than the
 * device's minimal I/O; past `chunkMaximumShift` it is EFAULT.
 */
export function chunkGeometry(
  capacitySectors: number,
  params: Params,
  minimumIoBytes: number = SECTOR_SIZE,
): ChunkGeometry {
  assert(Number.isSafeInteger(capacitySectors) && capacitySectors > 0, "Bad capacity");
  const minimumIoSectors = Math.ceil(minimumIoBytes / SECTOR_SIZE);
  const maximumCount = 2 ** params.chunkMaximumCountShift;
  let shift = params.chunkMinimumShift;
  const count = (s: number) => Math.ceil(capacitySectors / 2 ** (s - SECTOR_SHIFT));
  while (count(shift) > maximumCount || 2 ** (shift - SECTOR_SHIFT) < minimumIoSectors) shift++;
  if (shift > params.chunkMaximumShift) {
    throw new BlksnapError(
      "EFAULT",
      `The chunk size 2^${shift} for ${capacitySectors} sectors is past the maximum 2^${params.chunkMaximumShift}`,
    );
  }
  return {
    chunkShift: shift,
    chunkSectors: 2 ** (shift - SECTOR_SHIFT),
    chunkCount: count(shift),
  };
}

export const HEADER_BYTES = 64;
export const RECORD_BYTES = 32;
const RECORD_WORDS = RECORD_BYTES / 4;
const H_CAPACITY = 0;
const H_COUNT = 1;
const H_REHASH = 2;
const H_MAXIMUM = 3;
const R_STATE = 0;
const R_NUMBER_LO = 1;
const R_NUMBER_HI = 2;
const R_BUFFER = 3;
const R_OFFSET_LO = 4;
const R_OFFSET_HI = 5;
const R_SEQUENCE = 6;
const MINIMUM_SLOTS = 64;
/** Address space reserved for one table at most (its buffer is only committed as it grows). */
const MAXIMUM_TABLE_BYTES = 2 ** 32;

function nextPowerOfTwo(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/**
 * The chunk records of one device. Memory grows with the number of chunks
 * touched, never with the size of the device.
 */
export class ChunkTable {
  readonly #shared: SharedArrayBuffer;
  #header: Int32Array;
  #words: Int32Array;
  #capacity: number;
  readonly #isView: boolean;

  /**
   * @param source the most records the table will ever hold (the diff area
   *   derives it from the storage limit and the buffer pool); or, through
   *   {@linkcode ChunkTable.fromShared}, the buffer of an existing table.
   */
  constructor(source: number | SharedArrayBuffer) {
    if (typeof source !== "number") {
      assert(source.growable, "A chunk table buffer is growable");
      this.#shared = source;
      this.#header = new Int32Array(source, 0, HEADER_BYTES / 4);
      this.#capacity = 0;
      this.#words = new Int32Array(0);
      this.#isView = true;
      this.#sync();
      return;
    }
    const maximumRecords = source;
    assert(Number.isSafeInteger(maximumRecords) && maximumRecords > 0, "Bad maximum records");
    const maximumSlots = Math.min(
      nextPowerOfTwo(Math.max(MINIMUM_SLOTS, maximumRecords * 2)),
      (MAXIMUM_TABLE_BYTES - HEADER_BYTES) / RECORD_BYTES,
    );
    const capacity = MINIMUM_SLOTS;
    this.#shared = new SharedArrayBuffer(HEADER_BYTES + capacity * RECORD_BYTES, {
      maxByteLength: HEADER_BYTES + maximumSlots * RECORD_BYTES,
    });
    this.#header = new Int32Array(this.#shared, 0, HEADER_BYTES / 4);
    this.#header[H_CAPACITY] = capacity;
    this.#header[H_MAXIMUM] = Math.min(maximumRecords, maximumSlots / 2);
    this.#capacity = capacity;
    this.#words = new Int32Array(this.#shared, HEADER_BYTES, capacity * RECORD_WORDS);
    this.#isView = false;
  }

  /**
   * A read-only view of a table owned by another instance (for example in
   * another worker). It follows the owner's growth and must not claim or
   * transition. Across threads, a reader brackets a lookup with reads of
   * the rehash lock and retries when it was odd or changed.
   */
  static fromShared(shared: SharedArrayBuffer): ChunkTable {
    return new ChunkTable(shared);
  }

  /** Whether this instance only views another's table. */
  get isView(): boolean {
    return this.#isView;
  }

  /** Follows a growth made by the owner (views only). */
  #sync(): void {
    const capacity = Atomics.load(this.#header, H_CAPACITY);
    if (capacity === this.#capacity) return;
    this.#capacity = capacity;
    this.#words = new Int32Array(this.#shared, HEADER_BYTES, capacity * RECORD_WORDS);
  }

  /** The buffer to hand to workers (growable; it is never replaced). */
  get shared(): SharedArrayBuffer {
    return this.#shared;
  }
  /** Number of records (chunks touched). */
  get size(): number {
    return this.#header[H_COUNT]!;
  }
  get capacity(): number {
    if (this.#isView) this.#sync();
    return this.#capacity;
  }
  /** The most records the table accepts. */
  get maximumRecords(): number {
    return this.#header[H_MAXIMUM]!;
  }
  /** Bytes of memory committed by the table. */
  get byteLength(): number {
    return this.#shared.byteLength;
  }

  /** State of chunk `n`; NOT_COPIED when it has no record. */
  state(n: number): ChunkState {
    const slot = this.#find(n);
    return slot < 0 ? ChunkState.NOT_COPIED : this.#get(slot, R_STATE) as ChunkState;
  }

  /** Whether chunk `n` has a record (a copy-on-write claimed it). */
  has(n: number): boolean {
    return this.#find(n) >= 0;
  }

  /** Transition counter of chunk `n` (0 without a record). */
  sequence(n: number): number {
    const slot = this.#find(n);
    return slot < 0 ? 0 : this.#get(slot, R_SEQUENCE);
  }

  /** Buffer index of chunk `n`, or -1. */
  bufferIndex(n: number): number {
    const slot = this.#find(n);
    return slot < 0 ? -1 : this.#get(slot, R_BUFFER);
  }

  /** Offset of chunk `n` in the difference storage in sectors, or -1. */
  diffOffsetSectors(n: number): number {
    const slot = this.#find(n);
    if (slot < 0) return -1;
    const hi = this.#get(slot, R_OFFSET_HI);
    if (hi < 0) return -1;
    return hi * 2 ** 32 + (this.#get(slot, R_OFFSET_LO) >>> 0);
  }

  /**
   * Claims chunk `n`: NOT_COPIED → LOADING holding `bufferIndex`.
   * Returns false when the table is full (the caller treats it as overflow).
   */
  claim(n: number, bufferIndex: number): boolean {
    assert(!this.#isView, "A view of a chunk table cannot claim");
    assert(Number.isSafeInteger(n) && n >= 0, `Bad chunk number ${n}`);
    assert(bufferIndex >= 0, "A loading chunk holds a buffer");
    assert(this.#find(n) < 0, `Chunk #${n} is claimed twice`);
    if (this.size >= this.maximumRecords) return false;
    if ((this.size + 1) * 2 > this.#capacity) this.#grow();
    const slot = this.#probeEmpty(n);
    this.#set(slot, R_NUMBER_LO, n % 2 ** 32);
    this.#set(slot, R_NUMBER_HI, Math.floor(n / 2 ** 32));
    this.#set(slot, R_BUFFER, bufferIndex);
    this.#set(slot, R_OFFSET_LO, 0);
    this.#set(slot, R_OFFSET_HI, -1);
    this.#set(slot, R_SEQUENCE, 1);
    Atomics.store(this.#words, slot * RECORD_WORDS + R_STATE, ChunkState.LOADING);
    Atomics.add(this.#header, H_COUNT, 1);
    return true;
  }

  /**
   * Moves chunk `n` from `from` to `to`, asserting that it is in `from`
   * and that the move is legal. Entering STORED sets its offset; leaving the
   * buffer-holding states clears the buffer index, which the caller releases.
   */
  transition(n: number, from: ChunkState, to: ChunkState, diffOffsetSectors = -1): void {
    assert(!this.#isView, "A view of a chunk table cannot transition");
    const slot = this.#find(n);
    assert(
      slot >= 0,
      `Chunk #${n} has no record for ${chunkStateName(from)} → ${chunkStateName(to)}`,
    );
    const state = this.#get(slot, R_STATE);
    assert(
      state === from,
      `Chunk #${n} is ${chunkStateName(state)}, not ${chunkStateName(from)} (→ ${
        chunkStateName(to)
      })`,
    );
    assert(
      isLegalTransition(from, to),
      `Illegal chunk transition ${chunkStateName(from)} → ${chunkStateName(to)}`,
    );
    if (to === ChunkState.STORING) {
      assert(Number.isSafeInteger(diffOffsetSectors) && diffOffsetSectors >= 0, "No extent");
      this.#set(slot, R_OFFSET_LO, diffOffsetSectors % 2 ** 32);
      this.#set(slot, R_OFFSET_HI, Math.floor(diffOffsetSectors / 2 ** 32));
    }
    if (to === ChunkState.STORED || to === ChunkState.FAILED) this.#set(slot, R_BUFFER, -1);
    Atomics.store(this.#words, slot * RECORD_WORDS + R_STATE, to);
    const index = slot * RECORD_WORDS + R_SEQUENCE;
    Atomics.add(this.#words, index, 1);
    Atomics.notify(this.#words, index);
  }

  /** Calls `fn` for every record (for teardown and checks). */
  forEach(fn: (n: number, state: ChunkState, bufferIndex: number) => void): void {
    if (this.#isView) this.#sync();
    for (let slot = 0; slot < this.#capacity; slot++) {
      const state = this.#get(slot, R_STATE);
      if (state === 0) continue;
      fn(this.#number(slot), state as ChunkState, this.#get(slot, R_BUFFER));
    }
  }

  /** Counts records per state. */
  countByState(): Record<string, number> {
    const counts: Record<string, number> = {};
    this.forEach((_n, state) => {
      const name = chunkStateName(state);
      counts[name] = (counts[name] ?? 0) + 1;
    });
    return counts;
  }

  #get(slot: number, word: number): number {
    return Atomics.load(this.#words, slot * RECORD_WORDS + word);
  }

  #set(slot: number, word: number, value: number): void {
    Atomics.store(this.#words, slot * RECORD_WORDS + word, value);
  }

  #number(slot: number): number {
    return (this.#get(slot, R_NUMBER_HI) >>> 0) * 2 ** 32 + (this.#get(slot, R_NUMBER_LO) >>> 0);
  }

  #home(n: number): number {
    const lo = n >>> 0;
    const hi = Math.floor(n / 2 ** 32) >>> 0;
    let h = Math.imul(lo, 0x9e3779b1) ^ Math.imul(hi ^ 0x7f4a7c15, 0x85ebca77);
    h ^= h >>> 15;
    h = Math.imul(h, 0x2c1b3c6d);
    h ^= h >>> 12;
    return (h >>> 0) & (this.#capacity - 1);
  }

  #find(n: number): number {
    if (this.#isView) this.#sync();
    const mask = this.#capacity - 1;
    for (let slot = this.#home(n), probes = 0; probes < this.#capacity; probes++) {
      if (this.#get(slot, R_STATE) === 0) return -1;
      if (this.#number(slot) === n) return slot;
      slot = (slot + 1) & mask;
    }
    return -1;
  }

  #probeEmpty(n: number): number {
    const mask = this.#capacity - 1;
    for (let slot = this.#home(n), probes = 0; probes < this.#capacity; probes++) {
      if (this.#get(slot, R_STATE) === 0) return slot;
      slot = (slot + 1) & mask;
    }
    assert(false, "Chunk table has no empty slot");
  }

  #grow(): void {
    const capacity = this.#capacity * 2;
    const bytes = HEADER_BYTES + capacity * RECORD_BYTES;
    assert(bytes <= this.#shared.maxByteLength, "Chunk table grew past its maximum");
    Atomics.add(this.#header, H_REHASH, 1);
    const old = this.#words.slice();
    const oldCapacity = this.#capacity;
    this.#shared.grow(bytes);
    this.#capacity = capacity;
    this.#words = new Int32Array(this.#shared, HEADER_BYTES, capacity * RECORD_WORDS);
    this.#words.fill(0);
    for (let slot = 0; slot < oldCapacity; slot++) {
      const base = slot * RECORD_WORDS;
      if (old[base + R_STATE] === 0) continue;
      const n = (old[base + R_NUMBER_HI]! >>> 0) * 2 ** 32 + (old[base + R_NUMBER_LO]! >>> 0);
      const target = this.#probeEmpty(n);
      this.#words.set(old.subarray(base, base + RECORD_WORDS), target * RECORD_WORDS);
    }
    Atomics.store(this.#header, H_CAPACITY, capacity);
    Atomics.add(this.#header, H_REHASH, 1);
  }
}
