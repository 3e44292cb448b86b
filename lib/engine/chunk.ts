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
 * One growable SharedArrayBuffer holding an extendible hash table: a
 * directory of `2^depth` entries, indexed by the low `depth` bits of the
 * chunk number's 32-bit hash ({@linkcode chunkHash}), points to segments of
 * 256 slots, each an open-addressing table (linear probing within the
 * segment, from the top 8 bits of the hash; no deletion). Segments and
 * directories are appended to the buffer as needed (it grows by an eighth
 * at least); nothing is ever freed or moved but records of a splitting
 * segment. Everything is Int32 words, little-endian, in 32-byte records:
 *
 * | record 0 (header) word | field                                        |
 * |-----------------------:|----------------------------------------------|
 * |                      0 | global depth: the directory has 2^depth entries |
 * |                      1 | number of records                            |
 * |                      2 | layout sequence: odd while a segment splits or the directory doubles |
 * |                      3 | maximum number of records                    |
 * |                      4 | word index of the directory (0: none yet)    |
 * |                      5 | number of segments                           |
 * |                      6 | word index of the end of what is in use       |
 * |                      7 | reserved                                     |
 *
 * A directory entry is the record index of a segment's header record,
 * followed by the segment's 256 slot records:
 *
 * | word | segment header          | slot record                                      |
 * |-----:|-------------------------|--------------------------------------------------|
 * |    0 | local depth             | state ({@linkcode ChunkState}); 0 = empty slot    |
 * |    1 | records in the segment  | chunk number, low 32 bits                        |
 * |    2 |                         | chunk number, high bits                          |
 * |    3 |                         | buffer index in the pool, -1 when none           |
 * |    4 |                         | offset in the difference storage (sectors), low 32 bits |
 * |    5 |                         | offset in the difference storage, high bits, -1 if none |
 * |    6 |                         | transition counter (+1 at each transition; Atomics.notify) |
 * |    7 |                         | reserved                                         |
 *
 * A segment of local depth `l` is pointed to by every entry whose low `l`
 * bits are its own. When it reaches 3/4 full it splits before the next
 * claim into it: a new segment takes the records whose hash bit `l` is 1,
 * and the entries with that bit. When `l` equals the global depth, the
 * directory is doubled first: a new region holding the old one twice (two
 * memory copies of a word per ~100 records). So no claim rehashes the table;
 * one split moves at most 256 records.
 *
 * Only the owner (the diff area's thread) claims and transitions. A record
 * is written before its state is published with `Atomics.store`. Another
 * worker reading the table without a lock does it as a seqlock reader:
 * load the layout sequence; if odd, retry; look the chunk up (directory,
 * segment, probe) and copy the record's words, loading its state before and
 * after them and retrying if it changed; then load the sequence again and
 * retry if it changed. A split may move the record meanwhile, so a record
 * read after the loop may be another chunk's; and indexes read mid-change
 * may point anywhere, so a reader bounds-checks them and retries. A
 * transition publishes its state after setting the extent and before
 * clearing the buffer: a copy holds the buffer while its state holds one.
 * The buffer grows: before a lookup, a reader re-makes its view when header
 * word 6 (the end in use) is past it (a fixed-length view; a length-tracking
 * one works too, several times more slowly). A record moves when its segment splits, so a worker that
 * `Atomics.wait`s on a transition counter must wait with a timeout and look
 * the record up again. {@linkcode ChunkTable.fromShared} does all this.
 *
 * The buffer's maximum size is reserved up front (address space only) for
 * {@linkcode ChunkTable.maximumRecords} at a quarter of the segments' slots,
 * which a good hash never falls below. If a segment can nevertheless not
 * split (reserve or directory depth exhausted, memory refused), it fills up
 * to its last free slot; past that, or past the maximum, `claim()` returns
 * false and the diff area corrupts the snapshot with -ENOSPC.
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

export const HEADER_BYTES = 32;
export const RECORD_BYTES = 32;
const RECORD_WORDS = RECORD_BYTES / 4;
/** Slots of a segment (a power of 2). */
export const SEGMENT_SLOTS = 256;
const SEGMENT_SHIFT = 8;
const SEGMENT_WORDS = (SEGMENT_SLOTS + 1) * RECORD_WORDS;
/** A segment splits when it holds this many records. */
const SPLIT_RECORDS = (SEGMENT_SLOTS * 3) / 4;
/** Segments reserved per record of the maximum: a quarter of their slots. */
const RESERVE_RECORDS_PER_SEGMENT = SEGMENT_SLOTS / 4;
/** Deepest directory: its index bits stay clear of the 8 slot bits of the hash. */
const MAXIMUM_DEPTH = 24;
/** The most records of one table (32 TiB of 256 KiB chunks); more is -ENOSPC. */
export const MAXIMUM_RECORDS = 2 ** 27;

const H_DEPTH = 0;
const H_COUNT = 1;
const H_SEQUENCE = 2;
const H_MAXIMUM = 3;
const H_DIRECTORY = 4;
const H_SEGMENTS = 5;
const H_END = 6;
const S_DEPTH = 0;
const S_COUNT = 1;
const R_STATE = 0;
const R_NUMBER_LO = 1;
const R_NUMBER_HI = 2;
const R_BUFFER = 3;
const R_OFFSET_LO = 4;
const R_OFFSET_HI = 5;
const R_SEQUENCE = 6;
/** What a view's lookup gives when it read a layout mid-change (it retries). */
const TORN = -2;

/** The 32-bit hash of a chunk number: low bits pick the segment, the top 8 bits the slot. */
export function chunkHash(n: number): number {
  const lo = n >>> 0;
  const hi = Math.floor(n / 2 ** 32) >>> 0;
  let h = Math.imul(lo, 0x9e3779b1) ^ Math.imul(hi ^ 0x7f4a7c15, 0x85ebca77);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  h ^= h >>> 12;
  h = Math.imul(h, 0x297a2d39);
  h ^= h >>> 15;
  return h >>> 0;
}

/** Options of {@linkcode ChunkTable}. */
export interface ChunkTableOptions {
  /** The most records the table will hold; clamped to {@linkcode MAXIMUM_RECORDS}. */
  readonly maximumRecords: number;
  /** The most bytes it may use (a memory budget); it lowers the maximum of records to fit. */
  readonly maximumBytes?: number;
}

/**
 * The chunk records of one device. Memory grows with the number of chunks
 * touched, never with the size of the device.
 *
 * Lookups return a *slot* (a word index, -1 for none) read with the `…At`
 * accessors; a slot is valid until the next claim, which may move records.
 * A view's `…At` accessors read the copy of the record its last lookup made.
 */
export class ChunkTable {
  readonly #shared: SharedArrayBuffer;
  /**
   * A view of the words in use, made again when they grow (a fixed-length
   * view is several times faster than a length-tracking one).
   */
  #words: Int32Array;
  readonly #isView: boolean;
  /** Records of a splitting segment (owner only). */
  readonly #scratch: Int32Array;
  /** A view's copy of the record its last lookup found, read inside the seqlock. */
  readonly #record = new Int32Array(RECORD_WORDS);

  /**
   * @param source the options, or the most records the table will ever
   *   hold (the diff area derives it from the storage limit and the buffer
   *   pool); or, through {@linkcode ChunkTable.fromShared}, the buffer of an
   *   existing table.
   */
  constructor(source: number | ChunkTableOptions | SharedArrayBuffer) {
    if (source instanceof SharedArrayBuffer) {
      assert(source.growable, "A chunk table buffer is growable");
      this.#shared = source;
      this.#words = new Int32Array(source, 0, HEADER_BYTES / 4);
      this.#isView = true;
      this.#scratch = new Int32Array(0);
      return;
    }
    const options = typeof source === "number" ? { maximumRecords: source } : source;
    const requested = options.maximumRecords;
    assert(Number.isSafeInteger(requested) && requested > 0, "Bad maximum records");
    let maximumRecords = Math.min(requested, MAXIMUM_RECORDS);
    if (options.maximumBytes !== undefined) {
      assert(options.maximumBytes >= reservedBytes(1), "A chunk table needs its first segments");
      while (maximumRecords > 1 && reservedBytes(maximumRecords) > options.maximumBytes) {
        maximumRecords -= Math.max(1, Math.floor(maximumRecords / 16));
      }
    }
    this.#shared = new SharedArrayBuffer(HEADER_BYTES, {
      maxByteLength: reservedBytes(maximumRecords),
    });
    this.#words = new Int32Array(this.#shared, 0, HEADER_BYTES / 4);
    this.#words[H_MAXIMUM] = maximumRecords;
    this.#words[H_END] = HEADER_BYTES / 4;
    this.#isView = false;
    this.#scratch = new Int32Array(SEGMENT_SLOTS * RECORD_WORDS);
  }

  /**
   * A read-only view of a table owned by another instance (for example in
   * another worker). It must not claim or transition; across threads, see
   * the module documentation for how to read consistently.
   */
  static fromShared(shared: SharedArrayBuffer): ChunkTable {
    return new ChunkTable(shared);
  }

  /** Whether this instance only views another's table. */
  get isView(): boolean {
    return this.#isView;
  }
  /** The buffer to hand to workers (growable; it is never replaced). */
  get shared(): SharedArrayBuffer {
    return this.#shared;
  }
  /** Number of records (chunks touched). */
  get size(): number {
    return Atomics.load(this.#words, H_COUNT);
  }
  /** Slots of all segments. */
  get capacity(): number {
    return Atomics.load(this.#words, H_SEGMENTS) * SEGMENT_SLOTS;
  }
  /** The most records the table accepts. */
  get maximumRecords(): number {
    return this.#words[H_MAXIMUM]!;
  }
  /** Bytes of memory committed by the table. */
  get byteLength(): number {
    return this.#shared.byteLength;
  }
  /** The layout sequence (odd while records move), for seqlock readers. */
  get layoutSequence(): number {
    return Atomics.load(this.#words, H_SEQUENCE);
  }

  /**
   * The slot of chunk `n`, or -1 when it has no record (NOT_COPIED). A view
   * copies the record inside the seqlock for the `…At` accessors.
   */
  find(n: number): number {
    if (!this.#isView) return this.#find(n, chunkHash(n));
    const hash = chunkHash(n);
    for (;;) {
      const sequence = Atomics.load(this.#words, H_SEQUENCE);
      if ((sequence & 1) !== 0) continue;
      this.#follow();
      const slot = this.#find(n, hash);
      if (slot === TORN || (slot >= 0 && !this.#copyRecord(slot))) continue;
      if (Atomics.load(this.#words, H_SEQUENCE) === sequence) return slot;
    }
  }

  /** State at a slot from {@linkcode find}; NOT_COPIED for -1. */
  stateAt(slot: number): ChunkState {
    if (slot < 0) return ChunkState.NOT_COPIED;
    if (this.#isView) return this.#record[R_STATE] as ChunkState;
    return Atomics.load(this.#words, slot + R_STATE) as ChunkState;
  }
  /** Buffer index at a slot, or -1. */
  bufferAt(slot: number): number {
    if (slot < 0) return -1;
    return this.#isView ? this.#record[R_BUFFER]! : this.#words[slot + R_BUFFER]!;
  }
  /** Offset in the difference storage in sectors at a slot, or -1. */
  diffOffsetAt(slot: number): number {
    if (slot < 0) return -1;
    const words = this.#isView ? this.#record : this.#words;
    const base = this.#isView ? 0 : slot;
    const hi = words[base + R_OFFSET_HI]!;
    if (hi < 0) return -1;
    return hi * 2 ** 32 + (words[base + R_OFFSET_LO]! >>> 0);
  }

  /** State of chunk `n`; NOT_COPIED when it has no record. */
  state(n: number): ChunkState {
    return this.stateAt(this.find(n));
  }
  /** Whether chunk `n` has a record (a copy-on-write claimed it). */
  has(n: number): boolean {
    return this.find(n) >= 0;
  }
  /** Transition counter of chunk `n` (0 without a record). */
  sequence(n: number): number {
    const slot = this.find(n);
    if (slot < 0) return 0;
    return this.#isView ? this.#record[R_SEQUENCE]! : Atomics.load(this.#words, slot + R_SEQUENCE);
  }
  /** Buffer index of chunk `n`, or -1. */
  bufferIndex(n: number): number {
    return this.bufferAt(this.find(n));
  }
  /** Offset of chunk `n` in the difference storage in sectors, or -1. */
  diffOffsetSectors(n: number): number {
    return this.diffOffsetAt(this.find(n));
  }

  /**
   * Claims chunk `n`: NOT_COPIED → LOADING holding `bufferIndex`. Returns
   * false when the table cannot take it (the caller treats it as overflow).
   */
  claim(n: number, bufferIndex: number): boolean {
    assert(!this.#isView, "A view of a chunk table cannot claim");
    assert(Number.isSafeInteger(n) && n >= 0, `Bad chunk number ${n}`);
    assert(bufferIndex >= 0, "A loading chunk holds a buffer");
    const hash = chunkHash(n);
    assert(this.#find(n, hash) < 0, `Chunk #${n} is claimed twice`);
    if (this.#words[H_COUNT]! >= this.#words[H_MAXIMUM]!) return false;
    if (this.#words[H_DIRECTORY] === 0 && !this.#start()) return false;
    let segment = this.#segmentOf(hash);
    while (this.#words[segment + S_COUNT]! >= SPLIT_RECORDS && this.#split(segment, hash)) {
      segment = this.#segmentOf(hash);
    }
    const words = this.#words; // after any growth
    // Without a split the segment fills up, keeping one empty slot to end probes.
    if (words[segment + S_COUNT]! >= SEGMENT_SLOTS - 1) return false;
    const slot = this.#probeEmpty(segment, hash);
    words[slot + R_NUMBER_LO] = n % 2 ** 32;
    words[slot + R_NUMBER_HI] = Math.floor(n / 2 ** 32);
    words[slot + R_BUFFER] = bufferIndex;
    words[slot + R_OFFSET_LO] = 0;
    words[slot + R_OFFSET_HI] = -1;
    words[slot + R_SEQUENCE] = 1;
    Atomics.store(words, slot + R_STATE, ChunkState.LOADING);
    words[segment + S_COUNT]!++;
    Atomics.add(words, H_COUNT, 1);
    return true;
  }

  /**
   * Moves chunk `n` from `from` to `to`, asserting that it is in `from`
   * and that the move is legal. Entering STORING sets its offset; leaving the
   * buffer-holding states clears the buffer index, which the caller releases.
   */
  transition(n: number, from: ChunkState, to: ChunkState, diffOffsetSectors = -1): void {
    assert(!this.#isView, "A view of a chunk table cannot transition");
    const slot = this.#find(n, chunkHash(n));
    assert(
      slot >= 0,
      `Chunk #${n} has no record for ${chunkStateName(from)} → ${chunkStateName(to)}`,
    );
    const words = this.#words;
    const state = words[slot + R_STATE]!;
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
      words[slot + R_OFFSET_LO] = diffOffsetSectors % 2 ** 32;
      words[slot + R_OFFSET_HI] = Math.floor(diffOffsetSectors / 2 ** 32);
    }
    Atomics.store(words, slot + R_STATE, to);
    // after the state: a view that sees the old state must still see its buffer
    if (to === ChunkState.STORED || to === ChunkState.FAILED) words[slot + R_BUFFER] = -1;
    Atomics.add(words, slot + R_SEQUENCE, 1);
    Atomics.notify(words, slot + R_SEQUENCE);
  }

  /** Calls `fn` for every record (for teardown and checks). */
  forEach(fn: (n: number, state: ChunkState, bufferIndex: number) => void): void {
    this.#follow();
    const words = this.#words;
    const directory = Atomics.load(words, H_DIRECTORY);
    if (directory === 0) return;
    const depth = words[H_DEPTH]!;
    for (let i = 0; i < 2 ** depth; i++) {
      const segment = words[directory + i]! * RECORD_WORDS;
      // a segment of local depth l is at every entry with its low l bits: visit it at the first
      if (i >= 2 ** words[segment + S_DEPTH]!) continue;
      for (
        let slot = segment + RECORD_WORDS;
        slot < segment + SEGMENT_WORDS;
        slot += RECORD_WORDS
      ) {
        const state = Atomics.load(words, slot + R_STATE);
        if (state !== 0) fn(this.#number(slot), state as ChunkState, words[slot + R_BUFFER]!);
      }
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

  #number(slot: number): number {
    return (this.#words[slot + R_NUMBER_HI]! >>> 0) * 2 ** 32 +
      (this.#words[slot + R_NUMBER_LO]! >>> 0);
  }

  /** Word index of the header record of the segment for `hash`. */
  #segmentOf(hash: number): number {
    const words = this.#words;
    const depth = words[H_DEPTH]!;
    return words[words[H_DIRECTORY]! + (hash & ((1 << depth) - 1))]! * RECORD_WORDS;
  }

  /** The slot of chunk `n`, -1, or TORN when a view read a layout mid-change. */
  #find(n: number, hash: number): number {
    const words = this.#words;
    if (Atomics.load(words, H_DIRECTORY) === 0) return -1;
    const segment = this.#segmentOf(hash);
    // NaN (an entry past the view) fails it too
    if (!(segment >= 0 && segment + SEGMENT_WORDS <= words.length)) return TORN;
    const lo = n % 2 ** 32 | 0;
    const hi = Math.floor(n / 2 ** 32) | 0;
    let index = hash >>> (32 - SEGMENT_SHIFT);
    for (let probes = 0; probes < SEGMENT_SLOTS; probes++) {
      const slot = segment + (index + 1) * RECORD_WORDS;
      if (Atomics.load(words, slot + R_STATE) === 0) return -1;
      if (words[slot + R_NUMBER_LO] === lo && words[slot + R_NUMBER_HI] === hi) return slot;
      index = (index + 1) & (SEGMENT_SLOTS - 1);
    }
    return -1;
  }

  /**
   * A view copies the record at `slot` into #record; false when a transition
   * raced the copy. What the state does not hold reads as none: a view may
   * see the extent of STORING before the state, or a buffer after it left.
   */
  #copyRecord(slot: number): boolean {
    const words = this.#words;
    const record = this.#record;
    const state = Atomics.load(words, slot + R_STATE);
    record[R_BUFFER] = words[slot + R_BUFFER]!;
    record[R_OFFSET_LO] = words[slot + R_OFFSET_LO]!;
    record[R_OFFSET_HI] = words[slot + R_OFFSET_HI]!;
    record[R_SEQUENCE] = Atomics.load(words, slot + R_SEQUENCE);
    if (Atomics.load(words, slot + R_STATE) !== state) return false;
    record[R_STATE] = state;
    if (state === ChunkState.STORED || state === ChunkState.FAILED) record[R_BUFFER] = -1;
    if (state === ChunkState.LOADING || state === ChunkState.IN_MEMORY) record[R_OFFSET_HI] = -1;
    return true;
  }

  #probeEmpty(segment: number, hash: number): number {
    const words = this.#words;
    let index = hash >>> (32 - SEGMENT_SHIFT);
    for (let probes = 0; probes < SEGMENT_SLOTS; probes++) {
      const slot = segment + (index + 1) * RECORD_WORDS;
      if (words[slot + R_STATE] === 0) return slot;
      index = (index + 1) & (SEGMENT_SLOTS - 1);
    }
    assert(false, "A chunk table segment has no empty slot");
  }

  /** A view (of another's table) follows the owner's growth. */
  #follow(): void {
    const end = Atomics.load(this.#words, H_END);
    if (end > this.#words.length) this.#words = new Int32Array(this.#shared, 0, end);
  }

  /**
   * Appends `count` words (the buffer grows by an eighth at least, to keep
   * growths few); -1 when the reserve or the memory is exhausted.
   */
  #append(count: number): number {
    const start = this.#words[H_END]!;
    const bytes = (start + count) * 4;
    const maximum = this.#shared.maxByteLength;
    if (bytes > maximum) return -1;
    if (bytes > this.#shared.byteLength) {
      const ahead = Math.min(maximum, Math.max(bytes, Math.ceil(this.#shared.byteLength * 1.125)));
      try {
        this.#shared.grow(ahead - (ahead % 4));
      } catch (error) {
        if (!(error instanceof RangeError)) throw error;
        try {
          this.#shared.grow(bytes);
        } catch {
          return -1; // out of memory: an overflow of the snapshot, not a crash
        }
      }
    }
    this.#words = new Int32Array(this.#shared, 0, start + count);
    Atomics.store(this.#words, H_END, start + count);
    return start;
  }

  /** A new empty segment of local depth `depth`; its record index, or -1. */
  #newSegment(depth: number): number {
    const start = this.#append(SEGMENT_WORDS);
    if (start < 0) return -1;
    this.#words[start + S_DEPTH] = depth;
    Atomics.add(this.#words, H_SEGMENTS, 1);
    return start / RECORD_WORDS;
  }

  /** The first segment and a directory of one entry. */
  #start(): boolean {
    const directory = this.#append(RECORD_WORDS);
    if (directory < 0) return false;
    const segment = this.#newSegment(0);
    if (segment < 0) return false;
    this.#words[directory] = segment;
    this.#words[H_DEPTH] = 0;
    Atomics.store(this.#words, H_DIRECTORY, directory);
    return true;
  }

  /**
   * Splits the segment (word index `segment`) that holds `hash`: records whose
   * hash bit `local depth` is 1 move to a new segment. False when it cannot.
   */
  #split(segment: number, hash: number): boolean {
    const local = this.#words[segment + S_DEPTH]!;
    if (local === this.#words[H_DEPTH]! && !this.#doubleDirectory()) return false;
    const sibling = this.#newSegment(local + 1);
    if (sibling < 0) return false;
    const siblingWords = sibling * RECORD_WORDS;
    const words = this.#words; // after the growth
    const depth = words[H_DEPTH]!;
    const directory = words[H_DIRECTORY]!;
    this.#beginLayoutChange();
    // the entries of this segment share its low `local` bits; those with bit `local` set move
    const step = 2 ** (local + 1);
    for (let i = (hash & (2 ** local - 1)) + 2 ** local; i < 2 ** depth; i += step) {
      words[directory + i] = sibling;
    }
    words[segment + S_DEPTH] = local + 1;
    // move out every record, then put each back in its segment
    const scratch = this.#scratch;
    scratch.set(words.subarray(segment + RECORD_WORDS, segment + SEGMENT_WORDS));
    words.fill(0, segment + RECORD_WORDS, segment + SEGMENT_WORDS);
    words[segment + S_COUNT] = 0;
    for (let base = 0; base < scratch.length; base += RECORD_WORDS) {
      if (scratch[base + R_STATE] === 0) continue;
      const n = (scratch[base + R_NUMBER_HI]! >>> 0) * 2 ** 32 +
        (scratch[base + R_NUMBER_LO]! >>> 0);
      const recordHash = chunkHash(n);
      const target = ((recordHash >>> local) & 1) === 0 ? segment : siblingWords;
      const slot = this.#probeEmpty(target, recordHash);
      for (let word = 1; word < RECORD_WORDS; word++) words[slot + word] = scratch[base + word]!;
      words[slot + R_STATE] = scratch[base + R_STATE]!;
      words[target + S_COUNT]!++;
    }
    this.#endLayoutChange();
    return true;
  }

  /** Doubles the directory into a new region; false when it cannot. */
  #doubleDirectory(): boolean {
    const depth = this.#words[H_DEPTH]!;
    if (depth >= MAXIMUM_DEPTH) return false;
    const entries = 2 ** depth;
    const directory = this.#append(Math.ceil((entries * 2) / RECORD_WORDS) * RECORD_WORDS);
    if (directory < 0) return false;
    const words = this.#words; // after the growth
    const old = words[H_DIRECTORY]!;
    // indexed by low bits: entry i + 2^depth points where entry i did
    words.copyWithin(directory, old, old + entries);
    words.copyWithin(directory + entries, old, old + entries);
    this.#beginLayoutChange();
    words[H_DEPTH] = depth + 1;
    words[H_DIRECTORY] = directory;
    this.#endLayoutChange();
    return true;
  }

  #beginLayoutChange(): void {
    Atomics.add(this.#words, H_SEQUENCE, 1);
  }

  #endLayoutChange(): void {
    Atomics.add(this.#words, H_SEQUENCE, 1);
    Atomics.notify(this.#words, H_SEQUENCE);
  }
}

/**
 * Bytes reserved for a table of `maximumRecords`: the header, a segment per
 * quarter-segment of records, and every directory up to the depth that
 * spreads that many segments eight times over.
 */
function reservedBytes(maximumRecords: number): number {
  const segments = Math.max(2, Math.ceil(maximumRecords / RESERVE_RECORDS_PER_SEGMENT));
  const depth = Math.min(MAXIMUM_DEPTH, Math.ceil(Math.log2(segments)) + 3);
  // directories of 1, 2, 4 … 2^depth entries, each rounded up to a record
  let directoryWords = 0;
  for (let d = 0; d <= depth; d++) {
    directoryWords += Math.ceil(2 ** d / RECORD_WORDS) * RECORD_WORDS;
  }
  return HEADER_BYTES + segments * SEGMENT_WORDS * 4 + directoryWords * 4;
}
