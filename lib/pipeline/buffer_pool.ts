/**
 * The control half of a device's pool of copy-on-write buffers: which of its
 * `count` buffers are free, shared by every worker of the device. The data
 * (count × bufferBytes, page aligned) lives in C memory that the daemon maps
 * and hands to workers by address; tests use a SharedArrayBuffer instead.
 *
 * Any worker takes a buffer (a queue that claims a chunk, an image writer);
 * only the store worker, or a claimer whose load failed, gives it back. Take
 * and release are lock-free: a free bit per buffer, cleared by
 * compare-and-swap. A buffer is never free twice (asserted).
 *
 * | Int32 word | field                                        |
 * |-----------:|----------------------------------------------|
 * |          0 | count                                        |
 * |          1 | buffers in use                               |
 * |          2 | releases so far (waiters re-try when it moves) |
 * |          3 | the most in use at once                      |
 * |     4 .. 4+⌈count/32⌉ | free bits                         |
 *
 * @module
 */
import { assert, unreachable } from "../assert.ts";

const W_COUNT = 0;
const W_IN_USE = 1;
const W_RELEASES = 2;
const W_PEAK = 3;
const W_BITS = 4;

export function bufferPoolBytes(count: number): number {
  return (W_BITS + Math.ceil(count / 32)) * 4;
}

export class BufferPool {
  readonly shared: SharedArrayBuffer;
  readonly count: number;
  readonly #w: Int32Array;
  readonly #bitWords: number;
  #hint = 0;

  constructor(shared: SharedArrayBuffer) {
    this.shared = shared;
    this.#w = new Int32Array(shared);
    this.count = this.#w[W_COUNT]!;
    this.#bitWords = Math.ceil(this.count / 32);
    assert(this.#w.length >= W_BITS + this.#bitWords, "buffer pool control too small");
  }

  /** A pool of `count` buffers, all free. */
  static create(count: number): BufferPool {
    assert(Number.isSafeInteger(count) && count > 0 && count < 1 << 27, "bad pool size");
    const shared = new SharedArrayBuffer(bufferPoolBytes(count));
    const w = new Int32Array(shared);
    w[W_COUNT] = count;
    const pool = new BufferPool(shared);
    pool.reset();
    return pool;
  }

  /** Marks every buffer free (with no worker using the pool). */
  reset(): void {
    const w = this.#w;
    for (let i = 0; i < this.#bitWords; i++) {
      const left = this.count - i * 32;
      w[W_BITS + i] = left >= 32 ? -1 : (1 << left) - 1;
    }
    Atomics.store(w, W_IN_USE, 0);
    Atomics.store(w, W_PEAK, 0);
  }

  get inUse(): number {
    return Atomics.load(this.#w, W_IN_USE);
  }
  get peak(): number {
    return Atomics.load(this.#w, W_PEAK);
  }
  get releases(): number {
    return Atomics.load(this.#w, W_RELEASES);
  }

  /** Takes a free buffer; -1 when none is free. */
  take(): number {
    const w = this.#w;
    const words = this.#bitWords;
    for (let k = 0; k < words; k++) {
      const i = (this.#hint + k) % words;
      let bits = Atomics.load(w, W_BITS + i);
      while (bits !== 0) {
        const bit = 31 - Math.clz32(bits & -bits);
        const old = Atomics.compareExchange(w, W_BITS + i, bits, bits & ~(1 << bit));
        if (old === bits) {
          this.#hint = i;
          const used = Atomics.add(w, W_IN_USE, 1) + 1;
          // a maximum by compare-and-swap: a plain store could lower another worker's peak
          let peak = Atomics.load(w, W_PEAK);
          while (used > peak) {
            const seen = Atomics.compareExchange(w, W_PEAK, peak, used);
            if (seen === peak) break;
            peak = seen;
          }
          return i * 32 + bit;
        }
        bits = old;
      }
    }
    return -1;
  }

  /** Gives buffer `index` back. */
  release(index: number): void {
    if (!(index >= 0 && index < this.count)) unreachable(`release of buffer ${index}`);
    const mask = 1 << (index & 31);
    // uncount before freeing: a take right after the free bit must not count it twice
    Atomics.sub(this.#w, W_IN_USE, 1);
    const old = Atomics.or(this.#w, W_BITS + (index >>> 5), mask);
    if ((old & mask) !== 0) {
      Atomics.add(this.#w, W_IN_USE, 1);
      unreachable(`buffer ${index} released twice`);
    }
    Atomics.add(this.#w, W_RELEASES, 1);
    Atomics.notify(this.#w, W_RELEASES);
  }
}
