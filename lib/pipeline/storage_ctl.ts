/**
 * The control block of a snapshot's difference storage, shared between the
 * store worker (its only writer, apart from STOP) and the daemon's main
 * thread (status, events, stop).
 *
 * Space is handed out from the start in extents of whole units (2^UNIT_SHIFT
 * sectors). A file grows by GROWTH sectors with fallocate whenever what is
 * left of what was asked for falls under half a portion, never past LIMIT;
 * extents are handed out up to REQUESTED (the capacity plus the growth under
 * way), as the module does. When the capacity reaches the limit a `no_space`
 * event is raised once; an extent that cannot be had overflows: the chunk
 * fails and its device's part of the snapshot is corrupted with -ENOSPC.
 *
 * @module
 */
import { assert } from "../assert.ts";

export const STORAGE_KIND = { FILE: 0, TMPFILE: 1, BLOCKDEV: 2 } as const;
export const STORAGE_KIND_NAMES = ["file", "tmpfile", "blockdev"] as const;

/** Int32 words. */
export const SW = {
  STOP: 0,
  KIND: 1,
  UNIT_SHIFT: 2,
  /** no_space events raised (0 or 1). */
  NO_SPACE: 3,
  GROWING: 4,
  /** 1 once a growth failed: no more are tried. */
  CANNOT_GROW: 5,
  /** Bumped and notified whenever something changes that the main thread reports. */
  EVENTS: 6,
  EXITED: 7,
  WORDS: 16,
} as const;

/** Float64 slots (sectors unless said otherwise). */
export const SF = {
  CAPACITY: 0,
  REQUESTED: 1,
  FILLED: 2,
  LIMIT: 3,
  GROWTH: 4,
  /** Sectors asked for when no_space was raised. */
  NO_SPACE_REQUESTED: 5,
  /** Time of the no_space event, ms since the epoch. */
  NO_SPACE_TIME: 6,
  GROWTHS: 7,
  SLOTS: 8,
} as const;

const FLOATS = SW.WORDS * 4;

export class StorageCtl {
  readonly shared: SharedArrayBuffer;
  readonly w: Int32Array;
  readonly f: Float64Array;

  constructor(shared: SharedArrayBuffer) {
    assert(shared.byteLength >= FLOATS + SF.SLOTS * 8, "storage control block too small");
    this.shared = shared;
    this.w = new Int32Array(shared, 0, SW.WORDS);
    this.f = new Float64Array(shared, FLOATS, SF.SLOTS);
  }

  static create(options: {
    kind: number;
    capacitySectors: number;
    limitSectors: number;
    growthSectors: number;
    unitShift: number;
  }): StorageCtl {
    const ctl = new StorageCtl(new SharedArrayBuffer(FLOATS + SF.SLOTS * 8));
    ctl.w[SW.KIND] = options.kind;
    ctl.w[SW.UNIT_SHIFT] = options.unitShift;
    ctl.f[SF.CAPACITY] = options.capacitySectors;
    ctl.f[SF.REQUESTED] = options.capacitySectors;
    ctl.f[SF.LIMIT] = options.limitSectors;
    ctl.f[SF.GROWTH] = options.growthSectors;
    return ctl;
  }

  get capacitySectors(): number {
    return this.f[SF.CAPACITY]!;
  }
  get filledSectors(): number {
    return this.f[SF.FILLED]!;
  }
  get limitSectors(): number {
    return this.f[SF.LIMIT]!;
  }

  bumpEvents(): void {
    Atomics.add(this.w, SW.EVENTS, 1);
    Atomics.notify(this.w, SW.EVENTS);
  }
}
