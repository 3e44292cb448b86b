/**
 * A worker of the pipeline stress test (tests/unit/pipeline_stress_test.ts):
 * a writer (a queue of the tracked device), the store worker, or a reader
 * (a queue of the image). It runs the lib/pipeline protocol synchronously,
 * sharing memory only, until W.STOP; then it posts its stats.
 *
 * Pauses at the protocol's sensitive points widen the races: a writer
 * between the halves of a load (others find the chunk LOADING) and of a
 * write; the store worker before it stores (the pool runs dry) and in
 * STORING; a reader between the state word and the copy.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { Rng } from "../../lib/engine/_test_util.ts";
import { BufferPool } from "../../lib/pipeline/buffer_pool.ts";
import {
  bufferOf,
  CHUNK,
  ChunkMap,
  chunkStateName,
  stateOf,
} from "../../lib/pipeline/chunk_map.ts";
import {
  bufferReadValid,
  COW_SAFE,
  COW_WAIT_CHUNK,
  cowChunk,
  imageSource,
  originalReadValid,
  SRC_BUFFER,
  SRC_ORIGINAL,
  SRC_STORAGE,
} from "../../lib/pipeline/cow.ts";
import { CTL, DeviceCtl } from "../../lib/pipeline/device_ctl.ts";
import { SpscRing } from "../../lib/pipeline/spsc_ring.ts";
import { replay, type StressMessage, type StressSetup, W } from "./_pipeline_stress_shared.ts";

/** Int32 word of the pool's control block that counts releases (see buffer_pool.ts). */
const POOL_RELEASES_WORD = 2;
const SECTOR = 512;

const sleepWord = new Int32Array(new SharedArrayBuffer(4));
function sleep(ms: number): void {
  Atomics.wait(sleepWord, 0, 0, ms);
}

/** Thrown to leave the loops when the run stops. */
class Stopped extends Error {}

class StressWorker {
  readonly setup: StressSetup;
  readonly rng: Rng;
  readonly words: Int32Array;
  readonly ctl: DeviceCtl;
  readonly map: ChunkMap;
  readonly pool: BufferPool;
  readonly poolWords: Int32Array;
  readonly original: Uint8Array;
  readonly poolData: Uint8Array;
  readonly storage: Uint8Array;
  readonly model: Uint8Array;
  readonly written: Int32Array;
  readonly chunkBytes: number;
  readonly stats: Record<string, number> = {};

  constructor(setup: StressSetup) {
    this.setup = setup;
    const roleSalt = { writer: 1, reader: 101, store: 201 }[setup.role];
    this.rng = new Rng((setup.seed + Math.imul(0x9e3779b9, roleSalt + setup.index)) >>> 0);
    this.words = new Int32Array(setup.words);
    this.ctl = new DeviceCtl(setup.ctl);
    this.map = new ChunkMap(setup.map, setup.chunkCount);
    this.pool = new BufferPool(setup.pool);
    this.poolWords = new Int32Array(setup.pool);
    this.original = new Uint8Array(setup.original);
    this.poolData = new Uint8Array(setup.poolData);
    this.storage = new Uint8Array(setup.storage);
    this.model = new Uint8Array(setup.model);
    this.written = new Int32Array(setup.written);
    this.chunkBytes = setup.chunkBytes;
  }

  count(name: string, by = 1): void {
    this.stats[name] = (this.stats[name] ?? 0) + by;
  }

  checkStop(): void {
    if (Atomics.load(this.words, W.STOP) !== 0 || Atomics.load(this.words, W.FAIL) !== 0) {
      throw new Stopped();
    }
  }

  /** A failure: fatal in a strict run, counted otherwise. */
  fail(message: string): void {
    Atomics.add(this.words, W.MISMATCHES, 1);
    this.count("failures");
    if (this.stats["failures"] === 1 || this.setup.strict) {
      post({ type: "fail", message: `${replay(this.setup.seed)}: ${message}` });
    }
    if (this.setup.strict) {
      Atomics.store(this.words, W.FAIL, 1);
      throw new Stopped();
    }
  }

  /** Tells waiters of chunks that a chunk moved. */
  progress(): void {
    Atomics.add(this.words, W.PROGRESS, 1);
    if (this.ctl.waiters > 0) Atomics.notify(this.words, W.PROGRESS);
  }

  /** Copies `length` bytes, in two halves with a pause between them one time in `pauseOdds`. */
  copy(to: Uint8Array, toOffset: number, from: Uint8Array, fromOffset: number, length: number) {
    const half = (length / 2) & ~(SECTOR - 1);
    to.set(from.subarray(fromOffset, fromOffset + half), toOffset);
    if (this.rng.int(4) === 0) sleep(0.05);
    to.set(from.subarray(fromOffset + half, fromOffset + length), toOffset + half);
  }

  // ---- writer: a queue of the tracked device ----

  runWriter(): void {
    const ring = new SpscRing(this.setup.rings[this.setup.index]!);
    const chunkBytes = this.chunkBytes;
    const chunkCount = this.setup.chunkCount;
    const deviceBytes = chunkBytes * chunkCount;
    const sectorsPerChunk = chunkBytes / SECTOR;
    const data = new Uint32Array(3 * chunkBytes / 4);
    const dataBytes = new Uint8Array(data.buffer);
    for (let op = 0;; op++) {
      this.checkStop();
      // a range of 1 to 3 chunks' worth, sector aligned, over 1 to 3 chunks
      const spanChunks = this.rng.range(1, 3);
      const startByte = this.rng.int(chunkCount * sectorsPerChunk) * SECTOR;
      const length = Math.min(
        deviceBytes - startByte,
        this.rng.range(1, spanChunks * sectorsPerChunk) * SECTOR,
      );
      for (let i = 0; i < length / 4; i++) data[i] = this.rng.next() * 2 ** 32;
      while (!this.ctl.admit(this.setup.index)) {
        this.count("refused");
        this.checkStop();
        Atomics.wait(this.ctl.w, CTL.GATE, 1, 0.5);
      }
      try {
        const first = Math.floor(startByte / chunkBytes);
        const last = Math.floor((startByte + length - 1) / chunkBytes);
        if (this.ctl.cowActive) {
          if (this.setup.flaw !== "writers-skip-cow") this.copyOnWrite(ring, first, last);
          for (let n = first; n <= last; n++) Atomics.store(this.written, n, 1);
          this.count("cowWrites");
        }
        // the write reaches the original, in two halves to meet readers halfway
        this.copy(this.original, startByte, dataBytes, 0, length);
      } finally {
        this.ctl.finish(this.setup.index);
      }
      Atomics.add(this.words, W.OPS + this.setup.index, 1);
      this.count("writes");
    }
  }

  /** Makes chunks first..last safe (IN_MEMORY or later) before the write. */
  copyOnWrite(ring: SpscRing, first: number, last: number): void {
    for (let n = first; n <= last; n++) {
      for (;;) {
        // read what the waits compare against before looking, not to miss a wake-up
        const progress = Atomics.load(this.words, W.PROGRESS);
        const releases = Atomics.load(this.poolWords, POOL_RELEASES_WORD);
        const code = cowChunk(this.map, this.pool, n);
        if (code === COW_SAFE) break;
        if (code >= 0) {
          this.load(ring, n, code);
          break;
        }
        this.ctl.addParked(1);
        if (code === COW_WAIT_CHUNK) {
          this.count("waitChunk");
          Atomics.wait(this.words, W.PROGRESS, progress, 1);
        } else {
          this.count("waitBuffer");
          Atomics.wait(this.poolWords, POOL_RELEASES_WORD, releases, 1);
        }
        this.ctl.addParked(-1);
        this.checkStop();
      }
    }
  }

  /** Reads chunk `n`'s old content into `buffer`, then hands it to the store worker. */
  load(ring: SpscRing, n: number, buffer: number): void {
    const chunkBytes = this.chunkBytes;
    this.copy(this.poolData, buffer * chunkBytes, this.original, n * chunkBytes, chunkBytes);
    this.map.loaded(n);
    this.count("loads");
    while (!ring.push(n, buffer)) {
      this.count("ringFull");
      sleep(0.1);
      this.checkStop();
    }
    Atomics.add(this.words, W.PUSHED + this.setup.index, 1);
    Atomics.add(this.words, W.DOORBELL, 1);
    Atomics.notify(this.words, W.DOORBELL);
    this.progress();
  }

  // ---- the store worker ----

  runStore(): void {
    const rings = this.setup.rings.map((shared) => new SpscRing(shared));
    const record = new Float64Array(2);
    for (;;) {
      this.checkStop();
      const bell = Atomics.load(this.words, W.DOORBELL);
      let any = false;
      for (const ring of rings) {
        while (ring.pop(record)) {
          any = true;
          this.store(record[0]!, record[1]!);
        }
      }
      if (!any) Atomics.wait(this.words, W.DOORBELL, bell, 2);
    }
  }

  store(n: number, buffer: number): void {
    const chunkBytes = this.chunkBytes;
    const word = this.map.word(n);
    if (stateOf(word) !== CHUNK.IN_MEMORY || bufferOf(word) !== buffer) {
      this.fail(
        `store: chunk ${n} popped with buffer ${buffer} is ${
          chunkStateName(stateOf(word))
        } with buffer ${bufferOf(word)}`,
      );
      return;
    }
    if (this.rng.int(3) === 0) sleep(0.1); // let the pool run dry
    const slot = Atomics.add(this.words, W.NEXT_SLOT, 1);
    if (slot >= this.setup.chunkCount) {
      this.fail(`store: storage slot ${slot} for chunk ${n}: a chunk was stored twice`);
      return;
    }
    this.map.storing(n, slot);
    this.copy(this.storage, slot * chunkBytes, this.poolData, buffer * chunkBytes, chunkBytes);
    if (this.rng.int(4) === 0) sleep(0.05);
    this.map.stored(n);
    this.pool.release(buffer);
    Atomics.add(this.words, W.STORED, 1);
    this.count("stored");
    this.progress();
  }

  // ---- reader: a queue of the image ----

  runReader(): void {
    const chunkBytes = this.chunkBytes;
    const chunk = new Uint8Array(chunkBytes);
    const chunkWords = new Int32Array(chunk.buffer);
    const modelWords = new Int32Array(this.setup.model);
    for (let op = 0;; op++) {
      this.checkStop();
      Atomics.add(this.words, W.READERS_IN, 1);
      const epoch = Atomics.load(this.words, W.SNAP);
      if (epoch === 0) {
        Atomics.sub(this.words, W.READERS_IN, 1);
        Atomics.wait(this.words, W.SNAP, 0, 2);
        continue;
      }
      try {
        const first = this.rng.int(this.setup.chunkCount);
        const last = Math.min(this.setup.chunkCount - 1, first + this.rng.int(4));
        for (let n = first; n <= last; n++) {
          const source = this.readChunk(n, chunk);
          const base = n * chunkBytes / 4;
          let k = 0;
          while (k < chunkWords.length && chunkWords[k] === modelWords[base + k]) k++;
          if (k === chunkWords.length) continue;
          let byte = k * 4;
          while (chunk[byte] === this.model[n * chunkBytes + byte]) byte++;
          this.fail(
            `reader ${this.setup.index} op ${op} (epoch ${epoch}): chunk ${n} byte ${byte} read ${
              chunk[byte]
            } from ${source}, the snapshot holds ${this.model[n * chunkBytes + byte]}`,
          );
        }
      } finally {
        Atomics.sub(this.words, W.READERS_IN, 1);
      }
    }
  }

  /** Reads chunk `n` of the image into `out`; returns where it was found. */
  readChunk(n: number, out: Uint8Array): string {
    const chunkBytes = this.chunkBytes;
    const validate = this.setup.flaw !== "readers-skip-validation";
    for (;;) {
      const word = this.map.word(n);
      const source = imageSource(word);
      if (this.rng.int(4) === 0) sleep(0.05);
      if (source === SRC_ORIGINAL) {
        this.copy(out, 0, this.original, n * chunkBytes, chunkBytes);
        if (validate && !originalReadValid(this.map, n)) {
          this.count("retriesOriginal");
          continue;
        }
        this.count("fromOriginal");
        return `the original (${chunkStateName(stateOf(word))})`;
      }
      if (source === SRC_BUFFER) {
        const buffer = bufferOf(word);
        this.copy(out, 0, this.poolData, buffer * chunkBytes, chunkBytes);
        if (validate && !bufferReadValid(this.map, n, word)) {
          this.count("retriesBuffer");
          continue;
        }
        this.count("fromBuffer");
        return `buffer ${buffer} (${chunkStateName(stateOf(word))})`;
      }
      if (source === SRC_STORAGE) {
        const slot = this.map.offset(n);
        this.copy(out, 0, this.storage, slot * chunkBytes, chunkBytes);
        this.count("fromStorage");
        return `storage slot ${slot}`;
      }
      this.fail(`reader ${this.setup.index}: chunk ${n} is ${chunkStateName(stateOf(word))}`);
      return "nowhere";
    }
  }

  run(): void {
    try {
      Atomics.add(this.words, W.READY, 1);
      if (this.setup.role === "writer") this.runWriter();
      else if (this.setup.role === "store") this.runStore();
      else this.runReader();
    } catch (error) {
      if (!(error instanceof Stopped)) {
        Atomics.store(this.words, W.FAIL, 1);
        const text = error instanceof Error ? error.stack ?? error.message : String(error);
        post({
          type: "fail",
          message: `${replay(this.setup.seed)}: ${this.setup.role} ${this.setup.index}: ${text}`,
        });
      }
    }
    post({ type: "done", role: `${this.setup.role} ${this.setup.index}`, stats: this.stats });
  }
}

function post(message: StressMessage): void {
  self.postMessage(message);
}

self.onmessage = (event: MessageEvent<StressSetup>) => {
  new StressWorker(event.data).run();
};
