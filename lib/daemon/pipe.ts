/**
 * The pipeline state of one tracked device, made when it is attached: the
 * shared memory every worker of the device maps (control block, CBT map,
 * chunk map, buffer-pool control, store rings) and the eventfds that wake
 * its queues. It lives as long as the tracked device; snapshots only change
 * words in it, because a queue worker never receives a message again once
 * it serves I/O.
 */
import { EFD_CLOEXEC, type Libc } from "../../ffi/libc.ts";
import { CbtMap } from "../engine/cbt_map.ts";
import type { CbtFile } from "./cbt_file.ts";
import { type ChunkGeometry, chunkGeometry } from "../engine/chunk.ts";
import type { Params } from "../engine/params.ts";
import { BufferPool } from "../pipeline/buffer_pool.ts";
import { ChunkMap, chunkMapBytes } from "../pipeline/chunk_map.ts";
import { CTL, CTL_F, DeviceCtl, MAX_QUEUES } from "../pipeline/device_ctl.ts";
import { SpscRing } from "../pipeline/spsc_ring.ts";
import { type DeviceShared, STORE_RECORD_SLOTS } from "../ublk/targets/tracked.ts";
import { wakeAll, Waker } from "../ublk/targets/waker.ts";
import { addressOf } from "../uring/ring.ts";
import { assert } from "../assert.ts";

export class DevicePipe {
  readonly shared: DeviceShared;
  readonly ctl: DeviceCtl;
  readonly cbt: CbtMap;
  readonly chunks: ChunkMap;
  readonly pool: BufferPool;
  readonly geometry: ChunkGeometry;
  readonly wakeFds: number[];
  readonly #libc: Libc;
  readonly #waker: Waker;
  #poolPtr: Deno.PointerObject | null = null;
  #poolBytes = 0;
  #imageWakeFds: number[] = [];

  #cbtFile: CbtFile | null;

  constructor(libc: Libc, options: {
    sizeBytes: number;
    minimumIoBytes: number;
    params: Params;
    queues: number;
    /** The CBT map's file (cbt_file.ts); without one the map lives in the heap. */
    cbtFile?: CbtFile;
  }) {
    assert(options.queues <= MAX_QUEUES, "too many queues");
    this.#libc = libc;
    this.#waker = new Waker(libc);
    const sizeSectors = options.sizeBytes / 512;
    this.geometry = chunkGeometry(sizeSectors, options.params, options.minimumIoBytes);
    // The caller keeps the file until the pipe is made (a failure here leaves it to it).
    this.#cbtFile = null;
    this.cbt = options.cbtFile?.map ?? CbtMap.create(sizeSectors, options.params);
    this.chunks = ChunkMap.create(this.geometry.chunkCount);
    assert(this.chunks.shared.byteLength === chunkMapBytes(this.geometry.chunkCount), "chunk map");
    this.pool = BufferPool.create(options.params.freeDiffBufferPoolSize);
    const ring = () => SpscRing.create(this.pool.count, STORE_RECORD_SLOTS).shared;
    this.ctl = DeviceCtl.create();
    this.wakeFds = [];
    try {
      for (let q = 0; q < options.queues; q++) this.wakeFds.push(this.#eventfd());
      for (let q = 0; q < options.queues; q++) this.#imageWakeFds.push(this.#eventfd());
    } catch (err) {
      this.close();
      throw err;
    }
    this.#cbtFile = options.cbtFile ?? null;
    const w = this.ctl.w;
    w[CTL.QUEUES] = options.queues;
    this.wakeFds.forEach((fd, i) => (w[CTL.QUEUE_EFD + i] = fd));
    this.#imageWakeFds.forEach((fd, i) => (w[CTL.IMAGE_EFD + i] = fd));
    w[CTL.CHUNK_SHIFT] = this.geometry.chunkShift;
    w[CTL.CHUNK_COUNT] = this.geometry.chunkCount;
    w[CTL.POOL_COUNT] = this.pool.count;
    w[CTL.BUFFER_BYTES] = this.geometry.chunkSectors * 512;
    this.shared = {
      ctl: this.ctl.shared,
      cbt: this.cbt.shared,
      chunks: this.chunks.shared,
      pool: this.pool.shared,
      trackedRings: Array.from({ length: options.queues }, ring),
      imageRings: Array.from({ length: options.queues }, ring),
      sizeBytes: options.sizeBytes,
    };
  }

  get chunkBytes(): number {
    return this.geometry.chunkSectors * 512;
  }

  /** Eventfds of the image's queues (made at attach, reused by every image of the device). */
  get imageWakeFds(): number[] {
    return [...this.#imageWakeFds];
  }

  /** Lists the image's eventfds in the control block, so others wake its queues (or stop). */
  setImageQueues(active: boolean): void {
    Atomics.store(this.ctl.w, CTL.IMAGE_QUEUES, active ? this.#imageWakeFds.length : 0);
  }

  /** Whether copy-on-write memory is mapped (a take is armed). */
  get armed(): boolean {
    return this.#poolPtr !== null;
  }

  /**
   * With the gate closed and drained: arms copy-on-write for a new take
   * (fresh chunk map, rings and counters, pool memory, storage words) and
   * bumps the epoch. On failure nothing is armed.
   */
  arm(storage: { fd: number; storeWakeFd: number; unitShift: number }): void {
    assert(this.ctl.admitted === 0, "arm() with writes in flight");
    assert(this.#poolPtr === null, "arm() twice");
    this.chunks.clear();
    this.pool.reset();
    for (const r of [...this.shared.trackedRings, ...this.shared.imageRings]) {
      new SpscRing(r).reset();
    }
    this.ctl.resetCounters();
    this.#poolBytes = this.pool.count * this.chunkBytes;
    this.#poolPtr = this.#libc.mmapAnonymous(this.#poolBytes);
    const w = this.ctl.w;
    this.ctl.f[CTL_F.POOL_ADDRESS] = addressOf(this.#poolPtr);
    w[CTL.STORAGE_FD] = storage.fd;
    w[CTL.STORE_EFD] = storage.storeWakeFd;
    w[CTL.UNIT_SHIFT] = storage.unitShift;
    Atomics.store(w, CTL.ERROR, 0);
    Atomics.add(w, CTL.EPOCH, 1);
    Atomics.store(w, CTL.COW_ACTIVE, 1);
  }

  /** Stops copy-on-write (writes go straight through from now on) and wakes parked requests. */
  stopCow(): void {
    Atomics.store(this.ctl.w, CTL.COW_ACTIVE, 0);
    this.wakeAll();
  }

  /**
   * With the gate closed and the store worker gone: ends the take. When
   * `drained` is false a request may still hold pool memory or chunk words
   * (a queue died, or hangs): then they are left as they are and the memory
   * is leaked rather than pulled from under it.
   */
  disarm(drained: boolean): void {
    const w = this.ctl.w;
    Atomics.store(w, CTL.COW_ACTIVE, 0);
    this.ctl.f[CTL_F.POOL_ADDRESS] = 0;
    w[CTL.STORAGE_FD] = -1;
    w[CTL.STORE_EFD] = -1;
    Atomics.add(w, CTL.EPOCH, 1);
    if (this.#poolPtr !== null && drained) this.#libc.munmap(this.#poolPtr, this.#poolBytes);
    this.#poolPtr = null;
    if (!drained) return;
    this.chunks.clear();
    this.pool.reset();
  }

  wakeAll(): void {
    wakeAll(this.#waker, this.ctl);
  }

  /**
   * After the device, its image and every worker are gone. The CBT map's
   * file is deleted, unless `keepCbtMap` (the device stays, for a later
   * daemon to take over with its map).
   */
  close(options: { keepCbtMap?: boolean } = {}): void {
    if (options.keepCbtMap) this.#cbtFile?.close();
    else this.#cbtFile?.remove();
    this.setImageQueues(false);
    // Still armed means a take could not be ended cleanly: leak the memory, never unmap it.
    this.#poolPtr = null;
    for (const fd of [...this.wakeFds, ...this.#imageWakeFds]) this.#libc.close(fd);
    this.wakeFds.length = 0;
    this.#imageWakeFds = [];
  }

  #eventfd(): number {
    return this.#libc.check(this.#libc.sym.eventfd(0, EFD_CLOEXEC), "eventfd");
  }
}
