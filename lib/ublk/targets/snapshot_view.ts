/**
 * What the tracked and image targets share on a queue thread: the views of
 * the current take's memory (remade when the device's epoch moves, the only
 * allocation, once per take) and the parking of tags that wait for another
 * worker (counted in the device's WAITERS so that whoever makes progress
 * knows to wake the queues).
 */
import { ChunkMap } from "../../pipeline/chunk_map.ts";
import { CTL, type DeviceCtl } from "../../pipeline/device_ctl.ts";

const SECTOR = 512;

export class SnapshotView {
  #epoch = -1;
  map: ChunkMap | null = null;
  chunkShift = 0;
  chunkBytes = 0;
  /** Bytes of one unit of storage offsets. */
  unitBytes = 0;
  bufferBytes = 0;
  /** C address of buffer 0 of the pool. */
  poolBase = 0;
  /** The pool as 32-bit words (image copies); made only when asked for. */
  poolWords: Int32Array | null = null;
  readonly #ctl: DeviceCtl;
  readonly #chunks: SharedArrayBuffer;
  readonly #wantWords: boolean;

  constructor(ctl: DeviceCtl, chunks: SharedArrayBuffer, options: { poolWords: boolean }) {
    this.#ctl = ctl;
    this.#chunks = chunks;
    this.#wantWords = options.poolWords;
  }

  /** Brings the views up to the current take; false when no take is armed. */
  current(): boolean {
    const ctl = this.#ctl;
    const epoch = ctl.epoch;
    if (epoch === this.#epoch) return this.map !== null;
    this.#epoch = epoch;
    const w = ctl.w;
    const count = w[CTL.CHUNK_COUNT]!;
    const address = ctl.poolAddress;
    if (!ctl.cowActive || count <= 0 || address === 0) {
      this.map = null;
      this.poolWords = null;
      return false;
    }
    this.map = new ChunkMap(this.#chunks, count);
    this.chunkShift = w[CTL.CHUNK_SHIFT]!;
    this.chunkBytes = 2 ** this.chunkShift;
    this.unitBytes = 2 ** w[CTL.UNIT_SHIFT]! * SECTOR;
    this.bufferBytes = w[CTL.BUFFER_BYTES]!;
    this.poolBase = address;
    if (this.#wantWords) {
      const ptr = Deno.UnsafePointer.create(BigInt(address));
      const bytes = w[CTL.POOL_COUNT]! * this.bufferBytes;
      this.poolWords = new Int32Array(Deno.UnsafePointerView.getArrayBuffer(ptr!, bytes));
    }
    return true;
  }
}

/** Tags parked until a wake-up; each parked tag counts in the device's WAITERS. */
export class Parking {
  readonly #parked: Uint8Array;
  readonly #ctl: DeviceCtl;

  constructor(depth: number, ctl: DeviceCtl) {
    this.#parked = new Uint8Array(depth);
    this.#ctl = ctl;
  }

  get depth(): number {
    return this.#parked.length;
  }

  isParked(tag: number): boolean {
    return this.#parked[tag] !== 0;
  }

  park(tag: number): void {
    if (this.#parked[tag] !== 0) return;
    this.#parked[tag] = 1;
    this.#ctl.addParked(1);
  }

  unpark(tag: number): void {
    if (this.#parked[tag] === 0) return;
    this.#parked[tag] = 0;
    this.#ctl.addParked(-1);
  }
}
