/**
 * A single-producer/single-consumer ring of fixed-size records in a
 * SharedArrayBuffer: how a queue worker hands loaded chunks to the store
 * worker without a structured-clone message. A record is `recordSlots`
 * Float64 values (exact integers up to 2^53: chunk numbers, buffer indexes).
 *
 * The producer writes a record, then publishes it by storing the tail with
 * `Atomics.store`; the consumer loads the tail, reads, then frees the slot by
 * storing the head. Head and tail are free-running 32-bit counters, so
 * `tail - head` is the fill level even after they wrap. Waking the consumer
 * is the caller's business (an eventfd it has armed in its io_uring).
 *
 * | bytes   | field                                   |
 * |--------:|-----------------------------------------|
 * | 0       | head (Int32, consumer's)                |
 * | 64      | tail (Int32, producer's; own cache line) |
 * | 128     | capacity (records, power of two)        |
 * | 132     | record size (Float64 slots)             |
 * | 192 ..  | records                                 |
 *
 * @module
 */
import { assert } from "../assert.ts";

const HEAD = 0;
const TAIL = 16;
const CAPACITY = 32;
const SLOTS = 33;
const DATA_BYTES = 192;

export function spscRingBytes(capacity: number, recordSlots: number): number {
  return DATA_BYTES + capacity * recordSlots * 8;
}

export class SpscRing {
  readonly shared: SharedArrayBuffer;
  readonly capacity: number;
  readonly recordSlots: number;
  readonly #w: Int32Array;
  readonly #data: Float64Array;
  readonly #mask: number;

  constructor(shared: SharedArrayBuffer) {
    this.shared = shared;
    this.#w = new Int32Array(shared, 0, DATA_BYTES / 4);
    this.capacity = this.#w[CAPACITY]!;
    this.recordSlots = this.#w[SLOTS]!;
    assert(this.capacity > 0 && (this.capacity & (this.capacity - 1)) === 0, "bad ring capacity");
    assert(
      shared.byteLength >= spscRingBytes(this.capacity, this.recordSlots),
      "ring buffer too small",
    );
    this.#mask = this.capacity - 1;
    this.#data = new Float64Array(shared, DATA_BYTES, this.capacity * this.recordSlots);
  }

  /** A ring of at least `capacity` records (rounded up to a power of two). */
  static create(capacity: number, recordSlots: number): SpscRing {
    assert(Number.isSafeInteger(recordSlots) && recordSlots > 0, "bad record size");
    const cap = 2 ** Math.ceil(Math.log2(Math.max(1, capacity)));
    const shared = new SharedArrayBuffer(spscRingBytes(cap, recordSlots));
    const w = new Int32Array(shared, 0, DATA_BYTES / 4);
    w[CAPACITY] = cap;
    w[SLOTS] = recordSlots;
    return new SpscRing(shared);
  }

  /** Empties the ring; only while neither side uses it. */
  reset(): void {
    Atomics.store(this.#w, HEAD, 0);
    Atomics.store(this.#w, TAIL, 0);
  }

  /** Records waiting. */
  get length(): number {
    return (Atomics.load(this.#w, TAIL) - Atomics.load(this.#w, HEAD)) | 0;
  }

  /** Producer: appends a record of up to four values; false when the ring is full. */
  push(a: number, b = 0, c = 0, d = 0): boolean {
    const w = this.#w;
    const tail = w[TAIL]!; // only the producer writes it
    if (((tail - Atomics.load(w, HEAD)) | 0) >= this.capacity) return false;
    const base = (tail & this.#mask) * this.recordSlots;
    const data = this.#data;
    data[base] = a;
    if (this.recordSlots > 1) data[base + 1] = b;
    if (this.recordSlots > 2) data[base + 2] = c;
    if (this.recordSlots > 3) data[base + 3] = d;
    Atomics.store(w, TAIL, (tail + 1) | 0);
    return true;
  }

  /**
   * Consumer: copies the oldest record into `out` (recordSlots values) and
   * frees its slot; false when the ring is empty.
   */
  pop(out: Float64Array | number[]): boolean {
    const w = this.#w;
    const head = w[HEAD]!; // only the consumer writes it
    if (head === Atomics.load(w, TAIL)) return false;
    const base = (head & this.#mask) * this.recordSlots;
    for (let i = 0; i < this.recordSlots; i++) out[i] = this.#data[base + i]!;
    Atomics.store(w, HEAD, (head + 1) | 0);
    return true;
  }
}
