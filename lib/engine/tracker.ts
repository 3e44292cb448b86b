/**
 * The tracker of one original device (the module's `tracker`): it sees
 * every write, keeps the CBT map, and while a snapshot is taken makes each
 * write wait for the copy-on-write of the chunks it overwrites.
 *
 * The ublk target of the tracked device drives it, for every write-like
 * request (WRITE, DISCARD, WRITE_ZEROES):
 *
 * ```ts
 * await tracker.beforeWrite(sector, count); // CBT mark + copy-on-write
 * try {
 *   await original.write(sector, buf);      // the I/O to the original
 * } finally {
 *   tracker.endWrite();                     // always, even on failure
 * }
 * ```
 *
 * ({@linkcode Tracker.write} and {@linkcode Tracker.discard} do exactly that.)
 * `beforeWrite` never rejects because of the snapshot machinery: a failure
 * corrupts the snapshot and lets the write through (invariant 3), and a CBT
 * map out of step with the device (it grew since the last take) is marked
 * corrupted, as `cbt_map_set` does, and reset at the next take. It rejects
 * only for a range outside the device (EINVAL).
 *
 * The count of writes between `beforeWrite` and `endWrite` lets a take
 * quiesce the device — the userspace `blk_mq_freeze_queue` — so that every
 * device of a snapshot switches at one instant: no write is half before and
 * half after it.
 *
 * @module
 */

import { assertSectorBuffer, type BlockDevice, SECTOR_SIZE } from "./block_device.ts";
import { type CbtInfo, CbtMap } from "./cbt_map.ts";
import type { DiffArea } from "./diff_area.ts";
import { assert, BlksnapError } from "./errors.ts";
import type { Params } from "./params.ts";

/** Options of {@linkcode Tracker}. */
export interface TrackerOptions {
  readonly device: BlockDevice;
  readonly params: Params;
  /**
   * Other identities of the same device, e.g. the tracked ublk device's
   * "MAJ:MIN": a difference storage on any of them cannot join a snapshot.
   */
  readonly aliases?: readonly string[];
}

/** A range of sectors (`struct blksnap_sectors`). */
export interface SectorRange {
  readonly sector: number;
  readonly count: number;
}

/** What `snapshot_info` reports for a device (`struct blksnap_snapshotinfo`). */
export interface SnapshotInfo {
  /** 0, or the negative errno that corrupted the snapshot (-ENOSPC for an overflow). */
  readonly errorCode: number;
  /** The image's name once the snapshot is taken, "" otherwise. */
  readonly image: string;
}

/** The tracker of one device. */
export class Tracker {
  readonly device: BlockDevice;
  readonly params: Params;
  readonly cbtMap: CbtMap;
  /** The device's identities: its own and its aliases. */
  readonly deviceIds: ReadonlySet<string>;
  /** Id of the snapshot the device was added to, or null (managed by `Snapshots`). */
  snapshotId: string | null = null;
  /** Name of the snapshot image; set at take, replaceable by the ublk layer. */
  imageName = "";
  #diffArea: DiffArea | null = null;
  #writesInFlight = 0;
  #quiesced = false;
  #resumeWaiters: (() => void)[] = [];
  #drainWaiters: (() => void)[] = [];

  constructor(options: TrackerOptions) {
    this.device = options.device;
    this.params = options.params;
    assert(
      Number.isSafeInteger(this.device.sizeSectors) && this.device.sizeSectors > 0,
      `Bad device size ${this.device.sizeSectors}`,
    );
    this.cbtMap = CbtMap.create(this.device.sizeSectors, this.params);
    this.deviceIds = new Set([this.device.deviceId, ...(options.aliases ?? [])]);
  }

  get deviceId(): string {
    return this.device.deviceId;
  }
  /** Whether a snapshot of the device is taken (copy-on-write is on). */
  get isTaken(): boolean {
    return this.#diffArea !== null;
  }
  /** The difference area of the taken snapshot, or null. */
  get diffArea(): DiffArea | null {
    return this.#diffArea;
  }
  /** Writes between `beforeWrite` and `endWrite`. */
  get writesInFlight(): number {
    return this.#writesInFlight;
  }

  /**
   * To call before a write-like request reaches the original: marks the CBT
   * and waits for the copy-on-write of every chunk in range that the taken
   * snapshot still needs. Waits first while a take quiesces the device.
   * Each call must be matched by {@linkcode endWrite}.
   */
  async beforeWrite(sector: number, count: number): Promise<void> {
    this.#checkRange(sector, count);
    while (this.#quiesced) {
      await new Promise<void>((resolve) => this.#resumeWaiters.push(resolve));
    }
    this.#writesInFlight++;
    try {
      this.cbtMap.mark(sector, count);
      const diffArea = this.#diffArea;
      if (diffArea !== null) await diffArea.cow(sector, count);
    } catch (error) {
      this.endWrite();
      throw error;
    }
  }

  /** To call when the write admitted by {@linkcode beforeWrite} has completed or failed. */
  endWrite(): void {
    assert(this.#writesInFlight > 0, "endWrite() without beforeWrite()");
    this.#writesInFlight--;
    if (this.#writesInFlight === 0 && this.#drainWaiters.length > 0) {
      const waiters = this.#drainWaiters;
      this.#drainWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  /** A write to the tracked device: copy-on-write, then the original. */
  async write(sector: number, buf: Uint8Array): Promise<void> {
    assertSectorBuffer(buf);
    await this.beforeWrite(sector, buf.length / SECTOR_SIZE);
    try {
      await this.device.write(sector, buf);
    } finally {
      this.endWrite();
    }
  }

  /** A discard of the tracked device: a write as far as the snapshot is concerned. */
  async discard(sector: number, count: number): Promise<void> {
    await this.beforeWrite(sector, count);
    try {
      await this.device.discard(sector, count);
    } finally {
      this.endWrite();
    }
  }

  /** A read of the tracked device: straight to the original. */
  read(sector: number, buf: Uint8Array): Promise<void> {
    return this.device.read(sector, buf);
  }

  /** A flush of the tracked device. */
  flush(): Promise<void> {
    return this.device.flush();
  }

  /** Reads the snapshot image; ENODEV when no snapshot is taken, EIO when it is corrupted. */
  readImage(sector: number, buf: Uint8Array): Promise<void> {
    return this.#image().readImage(sector, buf);
  }

  /**
   * Writes the snapshot image. Both CBT maps are marked so that the next
   * backup rereads these blocks, as `snapimage_submit_bio` does; like it,
   * a CBT map that cannot be marked (corrupted, or out of step with a
   * resized device) does not fail the write. A range outside the device is
   * EINVAL before anything happens.
   */
  writeImage(sector: number, buf: Uint8Array): Promise<void> {
    const diffArea = this.#image();
    assertSectorBuffer(buf);
    this.#checkRange(sector, buf.length / SECTOR_SIZE);
    if (!diffArea.isCorrupted) {
      try {
        this.cbtMap.markBoth(sector, buf.length / SECTOR_SIZE);
      } catch (error) {
        if (!(error instanceof BlksnapError)) throw error;
      }
    }
    return diffArea.writeImage(sector, buf);
  }

  /** `cbtinfo`. */
  cbtInfo(): CbtInfo {
    return this.cbtMap.info();
  }

  /** `readcbtmap`: bytes of the frozen read map. */
  readCbtMap(offset: number, length: number): Uint8Array {
    return this.cbtMap.read(offset, length);
  }

  /** `markdirtyblock`: marks ranges changed in both maps. All are checked first. */
  markDirty(ranges: readonly SectorRange[]): void {
    for (const range of ranges) this.#checkRange(range.sector, range.count);
    for (const range of ranges) this.cbtMap.markBoth(range.sector, range.count);
  }

  /** `snapshot_info`. */
  snapshotInfo(): SnapshotInfo {
    return {
      errorCode: this.#diffArea?.errorCode ?? 0,
      image: this.#diffArea === null ? "" : this.imageName,
    };
  }

  /**
   * Holds new writes back and resolves once none is in flight. Used by a
   * take; must be followed by {@linkcode resume}.
   */
  async quiesce(): Promise<void> {
    assert(!this.#quiesced, "The tracker is already quiesced");
    this.#quiesced = true;
    while (this.#writesInFlight > 0) {
      await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
    }
  }

  /** Lets writes held by {@linkcode quiesce} go. */
  resume(): void {
    assert(this.#quiesced, "The tracker is not quiesced");
    this.#quiesced = false;
    const waiters = this.#resumeWaiters;
    this.#resumeWaiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * `tracker_take_snapshot`, with writes quiesced: resets a corrupted or
   * resized CBT map, switches it and turns copy-on-write on.
   */
  takeSnapshot(diffArea: DiffArea): void {
    assert(this.#quiesced && this.#writesInFlight === 0, "Take without quiesced writes");
    assert(this.#diffArea === null, "The tracker already has a snapshot taken");
    assert(diffArea.device === this.device, "The diff area is of another device");
    if (this.cbtMap.isCorrupted || this.cbtMap.capacitySectors !== this.device.sizeSectors) {
      this.cbtMap.reset(this.device.sizeSectors, this.params);
    }
    this.cbtMap.switch();
    this.#diffArea = diffArea;
    this.imageName = `blksnap-image_${this.deviceId}`;
  }

  /**
   * `tracker_release_snapshot`: turns copy-on-write off and ends the
   * difference area. Writes waiting for a copy give up waiting.
   */
  async releaseSnapshot(): Promise<void> {
    const diffArea = this.#diffArea;
    if (diffArea === null) return;
    this.#diffArea = null;
    await diffArea.close();
  }

  #image(): DiffArea {
    if (this.#diffArea === null) {
      throw new BlksnapError("ENODEV", `No snapshot of "${this.deviceId}" is taken`);
    }
    return this.#diffArea;
  }

  #checkRange(sector: number, count: number): void {
    if (
      !Number.isSafeInteger(sector) || !Number.isSafeInteger(count) || sector < 0 || count < 0 ||
      sector + count > this.device.sizeSectors
    ) {
      throw new BlksnapError(
        "EINVAL",
        `Sector range ${sector}+${count} is outside "${this.deviceId}" of ${this.device.sizeSectors} sectors`,
      );
    }
  }
}
