/**
 * The tracked device's I/O path: the passthrough to the original, plus what
 * the module's filter does to every write — mark the CBT map, and while a
 * snapshot is taken, copy-on-write of the chunks the write overwrites.
 *
 * A write-like request (WRITE, DISCARD, WRITE_ZEROES) goes through phases,
 * each on this queue's own thread and ring, holding only its own tag:
 *
 * 1. admit: the device's write gate (lib/pipeline/device_ctl.ts). While a
 *    take or destroy switches the device the gate is closed: the tag parks
 *    and is retried when the daemon opens the gate and wakes the queue.
 * 2. mark the CBT map (before the write is sent: a map never misses a write).
 * 3. copy-on-write, chunk by chunk (lib/pipeline/cow.ts): claim a chunk that
 *    is not copied and read its old content from the original into a pool
 *    buffer with SQEs on this ring (up to LOADS_PER_TAG at once); a chunk
 *    another queue is loading, or no free buffer, parks the tag until a
 *    wake-up. A loaded chunk becomes IN_MEMORY and goes to the store worker
 *    through this queue's SPSC ring.
 * 4. the write to the original, exactly as the passthrough does it, once
 *    every chunk of its range is IN_MEMORY or later (invariant 1).
 * 5. its completion ends the admission.
 *
 * Reads and flushes pass straight through. Nothing on these paths allocates;
 * views of a snapshot's memory are made once per take (the device's epoch).
 */
import { ERRNO } from "../../../ffi/errno.ts";
import { SQE } from "../../../ffi/uring_abi.ts";
import { UBLK_IO_OP } from "../../../ffi/ublk_abi.ts";
import { SECTOR_SHIFT, unitOf } from "../../engine/block_device.ts";
import { CbtMap } from "../../engine/cbt_map.ts";
import { BufferPool } from "../../pipeline/buffer_pool.ts";
import { CHUNK } from "../../pipeline/chunk_map.ts";
import { COW_SAFE, cowChunk } from "../../pipeline/cow.ts";
import { CTL, DeviceCtl, LANE } from "../../pipeline/device_ctl.ts";
import { SpscRing } from "../../pipeline/spsc_ring.ts";
import { packUserData, UD_KIND } from "../../uring/user_data.ts";
import { assert, unreachable } from "../../assert.ts";
import {
  type IoRequest,
  newIoRequest,
  PENDING,
  type QueueContext,
  type UblkTarget,
} from "../target.ts";
import { PassthroughTarget } from "./passthrough.ts";
import { wakeAll, Waker } from "./waker.ts";
import { Parking, SnapshotView } from "./snapshot_view.ts";

/**
 * The shared state of a tracked device, made at attach and handed to every
 * worker of it (tracked queues, image queues, store worker).
 */
export interface DeviceShared {
  ctl: SharedArrayBuffer;
  cbt: SharedArrayBuffer;
  chunks: SharedArrayBuffer;
  pool: SharedArrayBuffer;
  /** Per queue of the tracked device, its ring to the store worker. */
  trackedRings: SharedArrayBuffer[];
  /** Per queue of the image, its ring to the store worker. */
  imageRings: SharedArrayBuffer[];
  /** Bytes of the original device. */
  sizeBytes: number;
}

/** What one queue worker of a device sees of it. */
export interface TrackedShared {
  ctl: SharedArrayBuffer;
  cbt: SharedArrayBuffer;
  chunks: SharedArrayBuffer;
  pool: SharedArrayBuffer;
  /** This queue's ring to the store worker. */
  storeRing: SharedArrayBuffer;
  sizeBytes: number;
}

/** COW loads a tag may have in flight at once; their sub-index is LOAD_SUB + slot. */
const LOADS_PER_TAG = 64;
export const LOAD_SUB = 128;

const PHASE_IDLE = 0;
const PHASE_GATE = 1;
const PHASE_COW = 2;
const PHASE_IO = 3;

/** A record of the store ring: [chunk, buffer, bytes]. */
export const STORE_RECORD_SLOTS = 3;

export class TrackedTarget implements UblkTarget {
  readonly #pass: PassthroughTarget;
  readonly #ctl: DeviceCtl;
  readonly #cbt: CbtMap;
  readonly #pool: BufferPool;
  readonly #ring: SpscRing;
  readonly #waker: Waker;
  readonly #sizeBytes: number;

  // per tag
  readonly #phase: Uint8Array;
  readonly #op: Uint8Array;
  readonly #flags: Int32Array;
  // Sector and chunk numbers per tag in plain arrays: small integers stay
  // integers there (a Float64Array makes every use floating point, which is a
  // helper call per operation under TCG); past 2^31 they hold doubles.
  readonly #sector: number[];
  readonly #sectors: Int32Array;
  readonly #next: number[];
  readonly #last: number[];
  readonly #loads: Uint8Array;
  readonly #loadChunk: Float64Array;
  readonly #loadBuffer: Int32Array;
  readonly #loadBytes: Int32Array;
  readonly #req: IoRequest = newIoRequest();

  readonly #view: SnapshotView;
  readonly #parking: Parking;
  /** Profiling only (BLKSNAP_PROFILE_WRITE_PATH): 1 skips the gate, 2 the CBT mark, 3 both and COW. */
  readonly #profile: number;

  constructor(depth: number, shared: TrackedShared, waker: Waker) {
    this.#pass = new PassthroughTarget(depth);
    this.#ctl = new DeviceCtl(shared.ctl);
    this.#cbt = CbtMap.fromShared(shared.cbt);
    this.#pool = new BufferPool(shared.pool);
    this.#ring = new SpscRing(shared.storeRing);
    assert(this.#ring.capacity >= this.#pool.count, "a store ring holds every buffer");
    this.#waker = waker;
    this.#sizeBytes = shared.sizeBytes;
    this.#phase = new Uint8Array(depth);
    this.#view = new SnapshotView(this.#ctl, shared.chunks, { poolWords: false });
    this.#parking = new Parking(depth, this.#ctl);
    this.#op = new Uint8Array(depth);
    this.#flags = new Int32Array(depth);
    this.#sector = Array.from({ length: depth }, () => 0);
    this.#sectors = new Int32Array(depth);
    this.#next = Array.from({ length: depth }, () => 0);
    this.#last = Array.from({ length: depth }, () => 0);
    this.#loads = new Uint8Array(depth);
    this.#loadChunk = new Float64Array(depth * LOADS_PER_TAG);
    this.#loadBuffer = new Int32Array(depth * LOADS_PER_TAG);
    this.#loadBytes = new Int32Array(depth * LOADS_PER_TAG);
    const profile = Deno.env.get("BLKSNAP_PROFILE_WRITE_PATH") ?? "";
    this.#profile = profile === "nogate"
      ? 1
      : profile === "nomark"
      ? 2
      : profile === "pass"
      ? 3
      : 0;
  }

  start(q: QueueContext, req: IoRequest): number {
    const op = req.op;
    if (op !== UBLK_IO_OP.WRITE && op !== UBLK_IO_OP.DISCARD && op !== UBLK_IO_OP.WRITE_ZEROES) {
      return this.#pass.start(q, req);
    }
    if (this.#profile === 3) return this.#pass.start(q, req);
    const tag = req.tag;
    this.#op[tag] = op;
    this.#flags[tag] = req.flags;
    this.#sector[tag] = req.startSector;
    this.#sectors[tag] = req.nrSectors;
    return this.#admit(q, tag);
  }

  onCompletion(q: QueueContext, tag: number, sub: number, res: number): number {
    if (sub >= LOAD_SUB) return this.#loaded(q, tag, sub - LOAD_SUB, res);
    const result = this.#pass.onCompletion(q, tag, sub, res);
    if (result !== PENDING && this.#phase[tag] === PHASE_IO) {
      this.#phase[tag] = PHASE_IDLE;
      if (this.#profile !== 1) this.#ctl.finish(q.qId);
    }
    return result;
  }

  onWake(q: QueueContext): void {
    const phase = this.#phase;
    for (let tag = 0; tag < phase.length; tag++) {
      if (!this.#parking.isParked(tag)) continue;
      this.#parking.unpark(tag);
      const result = phase[tag] === PHASE_GATE ? this.#admit(q, tag) : this.#cow(q, tag);
      if (result !== PENDING) q.complete(tag, result);
    }
  }

  #admit(q: QueueContext, tag: number): number {
    if (this.#profile !== 1 && !this.#ctl.admit(q.qId)) {
      this.#phase[tag] = PHASE_GATE;
      this.#parking.park(tag);
      return PENDING;
    }
    const sector = this.#sector[tag]!;
    const sectors = this.#sectors[tag]!;
    // Before the write is sent: a map may over-mark but never misses a write.
    if (this.#profile !== 2) this.#cbt.mark(sector, sectors);
    if (this.#ctl.cowActive && this.#view.current()) {
      const shift = this.#view.chunkShift - SECTOR_SHIFT;
      this.#next[tag] = unitOf(sector, shift);
      this.#last[tag] = unitOf(sector + sectors - 1, shift);
      this.#phase[tag] = PHASE_COW;
      return this.#cow(q, tag);
    }
    return this.#submit(q, tag);
  }

  /** Advances the tag's copy-on-write; submits the write once every chunk is safe. */
  #cow(q: QueueContext, tag: number): number {
    const map = this.#view.map!;
    const base = tag * LOADS_PER_TAG;
    let n = this.#next[tag]!;
    const last = this.#last[tag]!;
    while (n <= last && this.#loads[tag]! < LOADS_PER_TAG) {
      if (!this.#ctl.cowActive) {
        n = last + 1; // destroyed or corrupted: nothing to keep any more
        break;
      }
      let r = cowChunk(map, this.#pool, n);
      if (r < 0 && r !== COW_SAFE) {
        // Announce the wait, then look once more: whoever moves the chunk or
        // frees a buffer reads WAITERS after doing so, so no wake-up is lost.
        this.#parking.park(tag);
        r = cowChunk(map, this.#pool, n);
        if (r < 0 && r !== COW_SAFE) {
          this.#next[tag] = n;
          this.#ctl.count(q.qId, LANE.PARKED);
          return PENDING;
        }
        this.#parking.unpark(tag);
      }
      if (r === COW_SAFE) {
        n++;
        continue;
      }
      // Claimed: read the old content into buffer r.
      let slot = 0;
      while (this.#loadBytes[base + slot] !== 0) slot++;
      const offset = n * this.#view.chunkBytes;
      const bytes = Math.min(this.#view.chunkBytes, this.#sizeBytes - offset);
      this.#loadChunk[base + slot] = n;
      this.#loadBuffer[base + slot] = r;
      this.#loadBytes[base + slot] = bytes;
      this.#loads[tag]!++;
      const sqe = q.ring.prepBuf(
        false,
        q.targetFile(0),
        this.#view.poolBase + r * this.#view.bufferBytes,
        bytes,
        offset,
        packUserData(UD_KIND.TARGET_IO, tag, LOAD_SUB + slot),
      );
      q.ring.sqeU8[sqe + SQE.flags] = q.fileFlags;
      q.targetSubmitted();
      n++;
    }
    this.#next[tag] = n;
    if (this.#loads[tag]! > 0 || n <= last) return PENDING;
    return this.#submit(q, tag);
  }

  #loaded(q: QueueContext, tag: number, slot: number, res: number): number {
    const i = tag * LOADS_PER_TAG + slot;
    const n = this.#loadChunk[i]!;
    const buffer = this.#loadBuffer[i]!;
    const bytes = this.#loadBytes[i]!;
    if (bytes === 0) unreachable(`COW load completion for an empty slot ${slot} of tag ${tag}`);
    this.#loadBytes[i] = 0;
    this.#loads[tag]!--;
    const map = this.#view.map!;
    if (res === bytes) {
      map.loaded(n);
      this.#ctl.count(q.qId, LANE.COW_LOADS);
      if (!this.#ring.push(n, buffer, bytes)) unreachable("store ring full");
      this.#waker.wake(this.#ctl.w[CTL.STORE_EFD]!);
    } else {
      // The old content is lost: this device's part of the snapshot is corrupted.
      this.#pool.release(map.failed(n, CHUNK.LOADING));
      if (this.#ctl.corrupt(res < 0 ? res : -ERRNO.EIO)) {
        console.error(`blksnap: copy-on-write read of chunk ${n} failed (${res})`);
      }
    }
    // Parked writers of this chunk (on any queue) may go on now.
    if (this.#ctl.waiters > 0) wakeAll(this.#waker, this.#ctl);
    if (this.#parking.isParked(tag)) return PENDING;
    return this.#cow(q, tag);
  }

  #submit(q: QueueContext, tag: number): number {
    this.#phase[tag] = PHASE_IO;
    const req = this.#req;
    req.tag = tag;
    req.op = this.#op[tag]!;
    req.flags = this.#flags[tag]!;
    req.startSector = this.#sector[tag]!;
    req.nrSectors = this.#sectors[tag]!;
    req.bufAddress = q.bufferAddress(tag);
    const result = this.#pass.start(q, req);
    if (result !== PENDING) {
      this.#phase[tag] = PHASE_IDLE;
      if (this.#profile !== 1) this.#ctl.finish(q.qId);
    }
    return result;
  }
}
