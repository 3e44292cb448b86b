/**
 * Helpers for the engine's tests (private to the tests): a seeded PRNG,
 * temporary directories, gates, and in-memory stand-ins.
 *
 * @module
 */

import {
  assertSectorRange,
  type BlockDevice,
  type IoHooks,
  type IoRequest,
  SECTOR_SIZE,
} from "./block_device.ts";
import type { DiffStorageFile, DiffStorageKind } from "./diff_storage.ts";
import { toBlksnapError } from "./errors.ts";

/** A small seeded PRNG (mulberry32). */
export class Rng {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** A float in [0, 1). */
  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** An integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError("pick() from nothing");
    return items[this.int(items.length)]!;
  }

  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i += 4) {
      const v = (this.next() * 4294967296) >>> 0;
      out[i] = v;
      if (i + 1 < n) out[i + 1] = v >>> 8;
      if (i + 2 < n) out[i + 2] = v >>> 16;
      if (i + 3 < n) out[i + 3] = v >>> 24;
    }
    return out;
  }

  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [items[i], items[j]] = [items[j]!, items[i]!];
    }
    return items;
  }
}

/** A seed from `BLKSNAP_SEED`, or a random one. */
export function seedFromEnv(): number {
  const text = Deno.env.get("BLKSNAP_SEED");
  if (text !== undefined && text !== "") return Number(text) >>> 0;
  return crypto.getRandomValues(new Uint32Array(1))[0]!;
}

/** A temporary directory removed at the end of the `await using` scope. */
export async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "blksnap-engine-" });
  return {
    path,
    async [Symbol.asyncDispose]() {
      await Deno.remove(path, { recursive: true });
    },
  };
}

/** Bytes all equal to `value`. */
export function filled(length: number, value: number): Uint8Array {
  return new Uint8Array(length).fill(value);
}

/** Resolves after `n` macrotask turns (0: one microtask). */
export async function yieldTurns(n: number): Promise<void> {
  if (n === 0) {
    await Promise.resolve();
    return;
  }
  for (let i = 0; i < n; i++) await new Promise((resolve) => setTimeout(resolve, 0));
}

/** A promise opened by hand, to hold an operation at a chosen point. */
export class Gate {
  #open = false;
  #waiters: (() => void)[] = [];

  get isOpen(): boolean {
    return this.#open;
  }

  wait(): Promise<void> {
    if (this.#open) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  open(): void {
    this.#open = true;
    for (const wake of this.#waiters) wake();
    this.#waiters = [];
  }
}

/** Hooks that delay each I/O by a random number of microtasks and turns. */
export function randomDelays(rng: Rng, maxTurns = 2): IoHooks {
  return {
    async before() {
      const microtasks = rng.int(4);
      for (let i = 0; i < microtasks; i++) await Promise.resolve();
      if (rng.chance(0.3)) await yieldTurns(rng.range(1, maxTurns));
    },
  };
}

/** Options of {@linkcode MemoryDiffStorageFile}. */
export interface MemoryDiffStorageFileOptions {
  readonly kind?: DiffStorageKind;
  readonly path?: string;
  readonly deviceId?: string;
  readonly sizeBytes?: number;
  /** False: writes are dropped and reads return zeros (for memory figures). */
  readonly keepData?: boolean;
  readonly hooks?: IoHooks;
}

/** An in-memory {@linkcode DiffStorageFile}, sparse (64 KiB pages). */
export class MemoryDiffStorageFile implements DiffStorageFile {
  readonly kind: DiffStorageKind;
  readonly path: string;
  readonly deviceId: string;
  hooks: IoHooks;
  readonly keepData: boolean;
  allocations: number[] = [];
  closed = false;
  #sizeBytes: number;
  readonly #pages = new Map<number, Uint8Array>();

  constructor(options: MemoryDiffStorageFileOptions = {}) {
    this.kind = options.kind ?? "file";
    this.path = options.path ?? "memory";
    this.deviceId = options.deviceId ?? "memory:diff";
    this.#sizeBytes = options.sizeBytes ?? 0;
    this.keepData = options.keepData ?? true;
    this.hooks = options.hooks ?? {};
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  async read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    await this.#before({ kind: "read", offsetBytes, lengthBytes: buf.length });
    this.#copy(offsetBytes, buf, false);
  }

  async write(offsetBytes: number, buf: Uint8Array): Promise<void> {
    await this.#before({ kind: "write", offsetBytes, lengthBytes: buf.length });
    if (this.keepData) this.#copy(offsetBytes, buf, true);
    this.#sizeBytes = Math.max(this.#sizeBytes, offsetBytes + buf.length);
  }

  async allocate(lengthBytes: number): Promise<void> {
    if (lengthBytes <= this.#sizeBytes) return;
    await this.#before({
      kind: "allocate",
      offsetBytes: this.#sizeBytes,
      lengthBytes: lengthBytes - this.#sizeBytes,
    });
    this.allocations.push(lengthBytes);
    this.#sizeBytes = lengthBytes;
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  async #before(request: IoRequest): Promise<void> {
    if (this.hooks.before === undefined) return;
    try {
      await this.hooks.before(request);
    } catch (error) {
      throw toBlksnapError(error, `${request.kind} of ${this.path}`);
    }
  }

  #copy(offsetBytes: number, buf: Uint8Array, write: boolean): void {
    const pageBytes = 65536;
    let done = 0;
    while (done < buf.length) {
      const at = offsetBytes + done;
      const index = Math.floor(at / pageBytes);
      const within = at - index * pageBytes;
      const n = Math.min(pageBytes - within, buf.length - done);
      let page = this.#pages.get(index);
      if (write) {
        if (page === undefined) this.#pages.set(index, page = new Uint8Array(pageBytes));
        page.set(buf.subarray(done, done + n), within);
      } else if (page === undefined) {
        buf.fill(0, done, done + n);
      } else {
        buf.set(page.subarray(within, within + n), done);
      }
      done += n;
    }
  }
}

/** A device of zeros that drops writes: for memory figures of huge devices. */
export class NullDevice implements BlockDevice {
  readonly sizeSectors: number;
  readonly logicalBlockSize = SECTOR_SIZE;
  readonly deviceId: string;

  constructor(sizeBytes: number, deviceId = "null:0") {
    this.sizeSectors = sizeBytes / SECTOR_SIZE;
    this.deviceId = deviceId;
  }

  read(sector: number, buf: Uint8Array): Promise<void> {
    assertSectorRange(sector, buf.length / SECTOR_SIZE, this.sizeSectors);
    buf.fill(0);
    return Promise.resolve();
  }

  write(sector: number, buf: Uint8Array): Promise<void> {
    assertSectorRange(sector, buf.length / SECTOR_SIZE, this.sizeSectors);
    return Promise.resolve();
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  discard(sector: number, count: number): Promise<void> {
    assertSectorRange(sector, count, this.sizeSectors);
    return Promise.resolve();
  }
}

/** Whether two byte arrays are equal; on mismatch, where. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}
