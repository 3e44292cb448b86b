/**
 * The chunk store-queue worker of one taken snapshot: it moves chunks that
 * the queues loaded (IN_MEMORY, in a pool buffer) into the difference
 * storage, and grows the storage.
 *
 * It sleeps in its own io_uring, where a read of its eventfd is armed; the
 * queues push (chunk, buffer, bytes) records to their SPSC rings and write
 * the eventfd. For each record: an extent of the storage (StorageCtl), the
 * chunk IN_MEMORY → STORING, a WRITE SQE from the buffer; on completion
 * STORING → STORED and the buffer goes back to the pool, and the queues are
 * woken if any request waits. Growth is an IORING_OP_FALLOCATE on the same
 * ring (the kernel runs it in its own worker thread), so the store never
 * blocks on it: this is the reallocation worker of the design, without a
 * thread of its own.
 *
 * Failures never stall a writer: an extent that cannot be had, or a write
 * that fails, fails the chunk and corrupts its device's part of the snapshot
 * (invariant 3).
 */
import { type Libc, openLibc, PR_SET_IO_FLUSHER } from "../../ffi/libc.ts";
import { openLiburing } from "../../ffi/liburing.ts";
import { ERRNO } from "../../ffi/errno.ts";
import { IORING_OP, IORING_SETUP } from "../../ffi/uring_abi.ts";
import { addressOf, Ring } from "../uring/ring.ts";
import { packUserData, UD_KIND, udKind, udSub, udTag } from "../uring/user_data.ts";
import { assert, unreachable } from "../assert.ts";
import { BufferPool } from "./buffer_pool.ts";
import { CHUNK, ChunkMap } from "./chunk_map.ts";
import { CTL, CTL_F, DeviceCtl } from "./device_ctl.ts";
import { SpscRing } from "./spsc_ring.ts";
import { SF, STORAGE_KIND, StorageCtl, SW } from "./storage_ctl.ts";
import { wakeAll, Waker } from "../ublk/targets/waker.ts";

export interface StoreDeviceInit {
  ctl: SharedArrayBuffer;
  chunks: SharedArrayBuffer;
  pool: SharedArrayBuffer;
  /** Rings from the tracked device's queues and the image's queues. */
  rings: SharedArrayBuffer[];
}

export interface StoreWorkerInit {
  type: "init";
  storageFd: number;
  wakeFd: number;
  storage: SharedArrayBuffer;
  devices: StoreDeviceInit[];
}

export type StoreWorkerReport =
  | { type: "ready" }
  | { type: "exited" }
  | { type: "fatal"; message: string };

const SECTOR = 512;
/** Sectors allocated by one fallocate of a growth (16 MiB: tmpfs holds the file for a whole call). */
const GROW_STEP_SECTORS = 32768;
/** A write's slot rides in the tag (16 bits) and sub-index (7 bits) of its user_data. */
const MAX_SLOTS = 1 << 23;

interface Dev {
  ctl: DeviceCtl;
  map: ChunkMap;
  pool: BufferPool;
  rings: SpscRing[];
}

export class StoreLoop {
  readonly #ring: Ring;
  readonly #waker: Waker;
  readonly #st: StorageCtl;
  readonly #fd: number;
  readonly #wakeFd: number;
  readonly #wakeBuf: Deno.PointerObject;
  readonly #libc: Libc;
  readonly #devs: Dev[];
  // in-flight writes, by slot
  readonly #slotDev: Int32Array;
  readonly #slotChunk: Float64Array;
  readonly #slotBuffer: Int32Array;
  readonly #slotBytes: Int32Array;
  readonly #freeSlots: number[];
  // records waiting for a growth: [dev, chunk, buffer, bytes] * n
  readonly #deferred: number[] = [];
  readonly #rec = new Float64Array(3);
  #inflight = 0;
  /** The step of the growth under way, and the capacity the growth aims at. */
  #growthSectors = 0;
  #growthTarget = 0;
  #poolsRegistered = false;

  constructor(init: StoreWorkerInit) {
    const libc = openLibc();
    this.#libc = libc;
    // Reclaim must not wait on the devices whose copy-on-write waits on this thread.
    libc.check(libc.sym.prctl(PR_SET_IO_FLUSHER, 1n, 0n, 0n, 0n), "prctl(PR_SET_IO_FLUSHER)");
    const uring = openLiburing();
    this.#waker = new Waker(libc);
    this.#st = new StorageCtl(init.storage);
    this.#fd = init.storageFd;
    this.#wakeFd = init.wakeFd;
    this.#wakeBuf = libc.alignedAlloc(64, 64);
    this.#devs = init.devices.map((d) => {
      const ctl = new DeviceCtl(d.ctl);
      return {
        ctl,
        map: new ChunkMap(d.chunks, ctl.w[CTL.CHUNK_COUNT]!),
        pool: new BufferPool(d.pool),
        rings: d.rings.map((r) => new SpscRing(r)),
      };
    });
    const slots = this.#devs.reduce((a, d) => a + d.pool.count, 0);
    assert(slots < MAX_SLOTS, "too many buffers for one store worker");
    this.#slotDev = new Int32Array(slots);
    this.#slotChunk = new Float64Array(slots);
    this.#slotBuffer = new Int32Array(slots);
    this.#slotBytes = new Int32Array(slots);
    this.#freeSlots = Array.from({ length: slots }, (_, i) => slots - 1 - i);
    const entries = 2 ** Math.ceil(Math.log2(slots + 8));
    this.#ring = new Ring(uring.symbols, libc, {
      entries,
      cqEntries: entries * 2,
      flags: IORING_SETUP.COOP_TASKRUN | IORING_SETUP.SINGLE_ISSUER,
    });
    this.#armWake();
    this.#ring.submit();
  }

  run(): void {
    const st = this.#st;
    for (;;) {
      this.#pollRings();
      const stopping = Atomics.load(st.w, SW.STOP) !== 0;
      if (stopping && this.#deferred.length > 0 && Atomics.load(st.w, SW.GROWING) === 0) {
        this.#dropDeferred();
      }
      if (stopping && this.#inflight === 0 && this.#deferred.length === 0 && this.#ringsEmpty()) {
        break;
      }
      this.#ring.submitAndWait(1);
      this.#ring.drain(this.#onCqe);
    }
    this.#ring.close();
    this.#libc.free(this.#wakeBuf);
    Atomics.store(st.w, SW.EXITED, 1);
    st.bumpEvents();
  }

  readonly #onCqe = (userData: number, res: number): void => {
    const kind = udKind(userData);
    if (kind === UD_KIND.WAKE) {
      this.#armWake(); // closing the ring cancels the last one
      return;
    }
    this.#inflight--;
    if (kind === UD_KIND.CTRL) this.#grown(res);
    else if (kind === UD_KIND.TARGET_IO) {
      this.#written(udTag(userData) | (udSub(userData) << 16), res);
    } else unreachable(`store worker: completion kind ${kind}`);
  };

  #armWake(): void {
    this.#ring.prepRw(
      IORING_OP.READ,
      this.#wakeFd,
      addressOf(this.#wakeBuf),
      8,
      0,
      packUserData(UD_KIND.WAKE, 0),
    );
  }

  #ringsEmpty(): boolean {
    for (const d of this.#devs) for (const r of d.rings) if (r.length > 0) return false;
    return true;
  }

  #pollRings(): void {
    const rec = this.#rec;
    for (let i = 0; i < this.#devs.length; i++) {
      for (const r of this.#devs[i]!.rings) {
        while (r.pop(rec)) this.#store(i, rec[0]!, rec[1]!, rec[2]!);
      }
    }
  }

  /** One loaded chunk: an extent and a write, or a failure of its device's snapshot. */
  #store(d: number, n: number, buffer: number, bytes: number): void {
    const dev = this.#devs[d]!;
    if (dev.ctl.error !== 0 || !dev.ctl.cowActive || Atomics.load(this.#st.w, SW.STOP) !== 0) {
      this.#fail(dev, n, CHUNK.IN_MEMORY, 0);
      return;
    }
    const st = this.#st;
    const unitShift = st.w[SW.UNIT_SHIFT]!;
    const unit = 1 << unitShift; // unitShift < 31 (not Math.pow: per chunk, costly under TCG)
    const sectors = Math.ceil(bytes / SECTOR / unit) * unit;
    const filled = st.f[SF.FILLED]!;
    if (filled + sectors > st.f[SF.REQUESTED]!) {
      if (this.#startGrowth(sectors)) {
        this.#deferred.push(d, n, buffer, bytes);
        return;
      }
      this.#noSpace(sectors); // a block device, or the limit: raised once
      this.#fail(dev, n, CHUNK.IN_MEMORY, -ERRNO.ENOSPC);
      return;
    }
    st.f[SF.FILLED] = filled + sectors;
    dev.ctl.f[CTL_F.FILLED_SECTORS]! += sectors;
    this.#startGrowth(0); // early, when less than half a portion is left
    dev.map.storing(n, filled / unit);
    const slot = this.#freeSlots.pop();
    assert(slot !== undefined, "store worker: no free write slot");
    this.#slotDev[slot] = d;
    this.#slotChunk[slot] = n;
    this.#slotBuffer[slot] = buffer;
    this.#slotBytes[slot] = bytes;
    if (!this.#poolsRegistered) this.#registerPools();
    this.#ring.prepBuf(
      true,
      this.#fd,
      // the pool is mapped at the take, after this worker started
      dev.ctl.poolAddress + buffer * dev.ctl.w[CTL.BUFFER_BYTES]!,
      bytes,
      filled * SECTOR,
      packUserData(UD_KIND.TARGET_IO, slot & 0xffff, slot >>> 16),
    );
    this.#inflight++;
  }

  /**
   * Registers every device's buffer pool with the ring (fixed buffers), so
   * writes to the storage copy through the kernel's mapping of pinned pages.
   * Done at the first chunk: the pools are mapped at the take, and every
   * device of the snapshot is armed before any chunk is loaded. Where the
   * kernel refuses, writes use plain buffers.
   */
  #registerPools(): void {
    this.#poolsRegistered = true;
    if (Deno.env.get("BLKSNAP_FIXED_BUFFERS") === "0") return;
    try {
      this.#ring.registerBuffers(this.#devs.map((d) => ({
        address: d.ctl.poolAddress,
        bytes: d.pool.count * d.ctl.w[CTL.BUFFER_BYTES]!,
      })));
    } catch (err) {
      console.error(`blksnap: store worker: no fixed buffers (${err})`);
    }
  }

  #written(slot: number, res: number): void {
    const dev = this.#devs[this.#slotDev[slot]!]!;
    const n = this.#slotChunk[slot]!;
    const buffer = this.#slotBuffer[slot]!;
    const ok = res === this.#slotBytes[slot];
    this.#freeSlots.push(slot);
    if (ok) {
      dev.map.stored(n);
      dev.pool.release(buffer);
      dev.ctl.f[CTL_F.STORED]!++;
      if (dev.ctl.waiters > 0) wakeAll(this.#waker, dev.ctl);
    } else {
      this.#fail(dev, n, CHUNK.STORING, res < 0 ? res : -ERRNO.EIO);
    }
  }

  /** The chunk fails (and with `negErrno`, its device's snapshot); its buffer goes back. */
  #fail(dev: Dev, n: number, from: number, negErrno: number): void {
    dev.pool.release(dev.map.failed(n, from));
    if (negErrno < 0 && dev.ctl.corrupt(negErrno)) {
      console.error(`blksnap: storing chunk ${n} failed (${negErrno}): snapshot corrupted`);
    }
    if (dev.ctl.waiters > 0) wakeAll(this.#waker, dev.ctl);
  }

  /**
   * Starts a growth when what is left is under half a portion (or under
   * `needSectors`). Returns whether a growth is (now) under way. A portion
   * is allocated in steps of GROW_STEP_SECTORS: a filesystem holds the
   * file's lock through one fallocate, and stores must not wait for a whole
   * portion (a gigabyte by default) behind it.
   */
  #startGrowth(needSectors: number): boolean {
    const st = this.#st;
    const w = st.w;
    const f = st.f;
    if (w[SW.GROWING] !== 0) return true;
    if (w[SW.KIND] === STORAGE_KIND.BLOCKDEV || w[SW.CANNOT_GROW] !== 0) return false;
    const capacity = f[SF.CAPACITY]!;
    const left = f[SF.REQUESTED]! - f[SF.FILLED]!;
    const portion = f[SF.GROWTH]!;
    if (left >= Math.max(needSectors, portion / 2)) return false;
    const size = Math.min(portion, f[SF.LIMIT]! - capacity);
    if (size <= 0 || size < needSectors - left) {
      this.#noSpace(needSectors);
      return false;
    }
    w[SW.GROWING] = 1;
    this.#growthTarget = capacity + size;
    f[SF.REQUESTED] = this.#growthTarget;
    this.#growStep();
    return true;
  }

  #growStep(): void {
    const capacity = this.#st.f[SF.CAPACITY]!;
    const step = Math.min(GROW_STEP_SECTORS, this.#growthTarget - capacity);
    this.#growthSectors = step;
    // fallocate SQE: off = offset, addr = length, len = mode (0: allocate and extend)
    this.#ring.prepRw(
      IORING_OP.FALLOCATE,
      this.#fd,
      step * SECTOR,
      0,
      capacity * SECTOR,
      packUserData(UD_KIND.CTRL, 0),
    );
    this.#inflight++;
  }

  #grown(res: number): void {
    const st = this.#st;
    // A filesystem without fallocate (EOPNOTSUPP) still grows the file as it is written.
    if (res === 0 || res === -ERRNO.EOPNOTSUPP) {
      st.f[SF.CAPACITY]! += this.#growthSectors;
      if (st.f[SF.CAPACITY]! < this.#growthTarget) {
        this.#growStep();
        return;
      }
      st.w[SW.GROWING] = 0;
      st.f[SF.GROWTHS]!++;
      // At the limit: the next portion is what it could not grow by.
      if (st.f[SF.CAPACITY]! >= st.f[SF.LIMIT]!) this.#noSpace(st.f[SF.GROWTH]!);
    } else {
      console.error(`blksnap: growing the difference storage failed (${res})`);
      st.w[SW.GROWING] = 0;
      st.w[SW.CANNOT_GROW] = 1;
      st.f[SF.REQUESTED] = st.f[SF.CAPACITY]!;
      this.#noSpace(this.#growthTarget - st.f[SF.CAPACITY]!);
    }
    st.bumpEvents();
    // Whatever waited for the growth goes again (or overflows now).
    const waiting = this.#deferred.splice(0);
    for (let i = 0; i < waiting.length; i += 4) {
      this.#store(waiting[i]!, waiting[i + 1]!, waiting[i + 2]!, waiting[i + 3]!);
    }
  }

  /**
   * Before the take: the first portion is allocated now, so that the first
   * copies after the take do not wait for it.
   */
  prepare(): void {
    if (!this.#startGrowth(0)) return;
    while (Atomics.load(this.#st.w, SW.GROWING) !== 0) {
      this.#ring.submitAndWait(1);
      this.#ring.drain(this.#onCqe);
    }
  }

  #dropDeferred(): void {
    const waiting = this.#deferred.splice(0);
    for (let i = 0; i < waiting.length; i += 4) {
      this.#fail(this.#devs[waiting[i]!]!, waiting[i + 1]!, CHUNK.IN_MEMORY, 0);
    }
  }

  #noSpace(requestedSectors: number): void {
    const st = this.#st;
    if (st.w[SW.NO_SPACE] !== 0) return;
    st.w[SW.NO_SPACE] = 1;
    st.f[SF.NO_SPACE_REQUESTED] = requestedSectors;
    st.f[SF.NO_SPACE_TIME] = Date.now();
    st.bumpEvents();
  }
}

/** Installs the message handler of a store worker (`self` inside the worker). */
export function runStoreWorker(self: Worker): void {
  self.onmessage = (ev: MessageEvent<StoreWorkerInit>) => {
    self.onmessage = null;
    const post = (r: StoreWorkerReport) => self.postMessage(r);
    try {
      const loop = new StoreLoop(ev.data);
      loop.prepare();
      post({ type: "ready" });
      loop.run();
      post({ type: "exited" });
    } catch (err) {
      post({
        type: "fatal",
        message: err instanceof Error ? (err.stack ?? err.message) : String(err),
      });
    }
  };
}
