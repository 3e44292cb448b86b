/**
 * The chunk map of one device while a snapshot is held: one state word and
 * one storage offset per chunk, dense, in one SharedArrayBuffer that every
 * worker of the device maps (the tracked device's queues, the image's
 * queues, the store worker).
 *
 * ## The chunk state machine
 *
 * ```
 *  NOT_COPIED ──claim──▶ LOADING ──loaded──▶ IN_MEMORY ──extent──▶ STORING ──written──▶ STORED
 *                           │                   │                     │
 *                           └───────────────────┴─────────────────────┴──────▶ FAILED
 * ```
 *
 * | from       | to        | who                                                    |
 * |------------|-----------|--------------------------------------------------------|
 * | NOT_COPIED | LOADING   | any worker, by compare-and-swap: the one that wins loads it |
 * | LOADING    | IN_MEMORY | the claimer, once the original's old content is in its buffer |
 * | LOADING    | FAILED    | the claimer, when reading the original failed         |
 * | IN_MEMORY  | STORING   | the store worker, with an extent of the storage       |
 * | IN_MEMORY  | FAILED    | the store worker, on overflow or a corrupted snapshot |
 * | STORING    | STORED    | the store worker, when the write completed            |
 * | STORING    | FAILED    | the store worker, when the write failed               |
 *
 * Nothing else is legal and every transition asserts it. A state word is
 * `state | bufferIndex << 4` (LOADING, IN_MEMORY and STORING hold a buffer of
 * the pool), so a reader gets the state and the buffer in one atomic load.
 * STORED and FAILED hold none, and never change again.
 *
 * Because the claim is a compare-and-swap on the chunk's own word, any queue
 * of the device can claim without a lock or a round trip: the one that wins
 * reads the old content on its own ring; the others park until the chunk
 * leaves LOADING. A write to the original over a chunk is sent only once the
 * chunk is IN_MEMORY or later (invariant 1); an image reader that read the
 * original re-checks the word afterwards: still NOT_COPIED or LOADING means
 * no write can have reached those sectors yet (invariant 2).
 *
 * Memory is 8 bytes per chunk (8 MiB per TiB with 256 KiB chunks), a
 * SharedArrayBuffer made when the device is attached (zero pages until a take
 * touches them: the kernel commits it lazily). The engine's
 * ChunkTable (a hash of touched chunks, one writer) stays the single-thread
 * engine's; dense words are what lets every queue claim lock-free.
 *
 * ## Layout
 *
 * | bytes                | field                                          |
 * |---------------------:|------------------------------------------------|
 * | 0 .. 4n              | Int32 state word per chunk                     |
 * | 4n .. 8n             | Uint32 offset in the storage, in `unit` sectors (valid from STORING) |
 *
 * @module
 */
import { assert, unreachable } from "../assert.ts";
import { ChunkState, chunkStateName } from "../engine/chunk.ts";

/** The states are the engine's (lib/engine/chunk.ts documents the same machine). */
export const CHUNK = ChunkState;
export { chunkStateName };

/** The state of a state word. */
export function stateOf(word: number): number {
  return word & 0xf;
}

/** The buffer index of a state word (meaningful in LOADING, IN_MEMORY, STORING). */
export function bufferOf(word: number): number {
  return word >>> 4;
}

/** A state word. */
export function makeWord(state: number, buffer = 0): number {
  return (state | (buffer << 4)) | 0;
}

/** Bytes of a chunk map for `chunkCount` chunks. */
export function chunkMapBytes(chunkCount: number): number {
  return chunkCount * 8;
}

export class ChunkMap {
  readonly chunkCount: number;
  readonly shared: SharedArrayBuffer;
  readonly #states: Int32Array;
  readonly #offsets: Uint32Array;

  constructor(shared: SharedArrayBuffer, chunkCount: number) {
    assert(Number.isSafeInteger(chunkCount) && chunkCount > 0, "bad chunk count");
    assert(shared.byteLength >= chunkMapBytes(chunkCount), "chunk map buffer too small");
    this.shared = shared;
    this.chunkCount = chunkCount;
    this.#states = new Int32Array(shared, 0, chunkCount);
    this.#offsets = new Uint32Array(shared, chunkCount * 4, chunkCount);
  }

  static create(chunkCount: number): ChunkMap {
    return new ChunkMap(new SharedArrayBuffer(chunkMapBytes(chunkCount)), chunkCount);
  }

  /** The state word of chunk `n` (one atomic load). */
  word(n: number): number {
    return Atomics.load(this.#states, n);
  }

  state(n: number): number {
    return Atomics.load(this.#states, n) & 0xf;
  }

  /** The storage offset of chunk `n` in units; valid once it reached STORING. */
  offset(n: number): number {
    return this.#offsets[n]!;
  }

  /** NOT_COPIED → LOADING holding `buffer`; false when another worker claimed it first. */
  tryClaim(n: number, buffer: number): boolean {
    return Atomics.compareExchange(this.#states, n, 0, makeWord(CHUNK.LOADING, buffer)) === 0;
  }

  /** LOADING → IN_MEMORY (the claimer). */
  loaded(n: number): void {
    this.#move(n, CHUNK.LOADING, CHUNK.IN_MEMORY, true);
  }

  /** IN_MEMORY → STORING at `offsetUnits` (the store worker). */
  storing(n: number, offsetUnits: number): void {
    assert(offsetUnits >= 0 && offsetUnits <= 0xffff_ffff, "storage offset out of range");
    this.#offsets[n] = offsetUnits;
    this.#move(n, CHUNK.IN_MEMORY, CHUNK.STORING, true);
  }

  /** STORING → STORED (the store worker); the buffer is released by the caller after. */
  stored(n: number): void {
    this.#move(n, CHUNK.STORING, CHUNK.STORED, false);
  }

  /** LOADING, IN_MEMORY or STORING → FAILED; returns the buffer the chunk held. */
  failed(n: number, from: number): number {
    assert(
      from === CHUNK.LOADING || from === CHUNK.IN_MEMORY || from === CHUNK.STORING,
      "only a chunk holding a buffer can fail",
    );
    const word = Atomics.load(this.#states, n);
    if (stateOf(word) !== from) this.#illegal(n, word, CHUNK.FAILED);
    Atomics.store(this.#states, n, CHUNK.FAILED);
    return bufferOf(word);
  }

  /** Forgets every chunk (between snapshots, with no worker using the map). */
  clear(): void {
    this.#states.fill(0);
    this.#offsets.fill(0);
  }

  /** Counts chunks per state (status and tests; walks the whole map). */
  countByState(): number[] {
    const counts = [0, 0, 0, 0, 0, 0];
    for (let n = 0; n < this.chunkCount; n++) counts[stateOf(Atomics.load(this.#states, n))]!++;
    return counts;
  }

  #move(n: number, from: number, to: number, keepBuffer: boolean): void {
    const word = Atomics.load(this.#states, n);
    if (stateOf(word) !== from) this.#illegal(n, word, to);
    Atomics.store(this.#states, n, keepBuffer ? makeWord(to, bufferOf(word)) : to);
  }

  #illegal(n: number, word: number, to: number): never {
    unreachable(
      `chunk #${n} is ${chunkStateName(stateOf(word))}: illegal move to ${chunkStateName(to)}`,
    );
  }
}
