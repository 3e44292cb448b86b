/**
 * The pool of chunk buffers of one device (the module's `diff_buffer`).
 *
 * A chunk copied from the original waits in a buffer until the storer has
 * written it to the difference storage. The pool is bounded by
 * `free_diff_buffer_pool_size`: when every buffer is in use, writers wait
 * (see `diff_area.ts`) instead of the pool growing. Buffers are made lazily,
 * so an idle snapshot holds none.
 *
 * ## Shared layout
 *
 * - `shared`: a growable SharedArrayBuffer; buffer `i` is the bytes
 *   `[i * bufferBytes, (i + 1) * bufferBytes)`. It grows by one buffer when
 *   no made buffer is free, up to `maximumBuffers`, and never shrinks.
 * - `controlShared`: Int32 words
 *
 *   | word      | field                                          |
 *   |----------:|------------------------------------------------|
 *   |         0 | number of free buffers on the stack            |
 *   |         1 | number of buffers made                         |
 *   |         2 | reserved                                       |
 *   |         3 | reserved                                       |
 *   | 4 .. 4+m  | stack of free buffer indices (m = maximumBuffers) |
 *
 *   followed by one byte per buffer: 1 while it is taken.
 *
 * Only the diff area's owner thread takes and releases buffers; other
 * workers only read and write the bytes of buffers they were handed.
 *
 * @module
 */

import { assert } from "./errors.ts";

const W_FREE = 0;
const W_MADE = 1;
const STACK = 4;

/** Options of {@linkcode DiffBufferPool}. */
export interface DiffBufferPoolOptions {
  /** Size of one buffer: the chunk size in bytes. */
  readonly bufferBytes: number;
  /** The bound, `free_diff_buffer_pool_size`. */
  readonly maximumBuffers: number;
}

/** A bounded pool of chunk-sized buffers in shared memory. */
export class DiffBufferPool {
  readonly bufferBytes: number;
  readonly maximumBuffers: number;
  readonly #shared: SharedArrayBuffer;
  readonly #controlShared: SharedArrayBuffer;
  readonly #control: Int32Array;
  readonly #taken: Uint8Array;
  /** One view per buffer made, so that handing a buffer out allocates nothing. */
  readonly #views: Uint8Array[] = [];

  constructor(options: DiffBufferPoolOptions) {
    const { bufferBytes, maximumBuffers } = options;
    assert(Number.isSafeInteger(bufferBytes) && bufferBytes > 0, "Bad buffer size");
    assert(Number.isSafeInteger(maximumBuffers) && maximumBuffers > 0, "Bad buffer count");
    this.bufferBytes = bufferBytes;
    this.maximumBuffers = maximumBuffers;
    this.#shared = new SharedArrayBuffer(0, { maxByteLength: bufferBytes * maximumBuffers });
    const wordsBytes = (STACK + maximumBuffers) * 4;
    this.#controlShared = new SharedArrayBuffer(wordsBytes + maximumBuffers);
    this.#control = new Int32Array(this.#controlShared, 0, STACK + maximumBuffers);
    this.#taken = new Uint8Array(this.#controlShared, wordsBytes, maximumBuffers);
  }

  /** The buffers' bytes, for workers. */
  get shared(): SharedArrayBuffer {
    return this.#shared;
  }
  /** The free stack and taken flags, for workers. */
  get controlShared(): SharedArrayBuffer {
    return this.#controlShared;
  }
  /** Buffers made so far. */
  get made(): number {
    return this.#control[W_MADE]!;
  }
  /** Buffers taken and not yet released. */
  get inUse(): number {
    return this.made - this.#control[W_FREE]!;
  }
  /** Buffers that {@linkcode take} can still hand out. */
  get available(): number {
    return this.maximumBuffers - this.inUse;
  }
  /** Bytes of memory committed by the pool. */
  get byteLength(): number {
    return this.#shared.byteLength + this.#controlShared.byteLength;
  }

  /** Takes a buffer, making one if none is free; -1 when the pool is exhausted. */
  take(): number {
    const free = this.#control[W_FREE]!;
    let index: number;
    if (free > 0) {
      index = this.#control[STACK + free - 1]!;
      this.#control[W_FREE] = free - 1;
    } else {
      const made = this.#control[W_MADE]!;
      if (made === this.maximumBuffers) return -1;
      this.#shared.grow((made + 1) * this.bufferBytes);
      this.#views.push(new Uint8Array(this.#shared, made * this.bufferBytes, this.bufferBytes));
      this.#control[W_MADE] = made + 1;
      index = made;
    }
    assert(this.#taken[index] === 0, `Buffer ${index} is handed out twice`);
    this.#taken[index] = 1;
    return index;
  }

  /** Returns a buffer to the pool. */
  release(index: number): void {
    assert(
      Number.isInteger(index) && index >= 0 && index < this.made,
      `Bad buffer index ${index}`,
    );
    assert(this.#taken[index] === 1, `Buffer ${index} is released twice`);
    this.#taken[index] = 0;
    const free = this.#control[W_FREE]!;
    assert(free < this.made, "Free stack overflow");
    this.#control[STACK + free] = index;
    this.#control[W_FREE] = free + 1;
  }

  /**
   * The first `lengthBytes` bytes of buffer `index` (default: all of it);
   * the whole buffer's view is made once and handed out again.
   */
  view(index: number, lengthBytes: number = this.bufferBytes): Uint8Array {
    assert(this.#taken[index] === 1, `Buffer ${index} is not taken`);
    assert(lengthBytes <= this.bufferBytes, "View past the buffer");
    const view = this.#views[index]!;
    return lengthBytes === this.bufferBytes ? view : view.subarray(0, lengthBytes);
  }
}
