/**
 * Snapshots (the module's `snapshot`): each holds a difference storage, an
 * event queue and the trackers of its devices. Several snapshots may exist
 * at once, but a device belongs to at most one.
 *
 * Life of a snapshot: {@linkcode Snapshots.create} (storage and limit; a new
 * UUID), {@linkcode Snapshots.addDevice} for each device,
 * {@linkcode Snapshots.take} (all devices switch their CBT maps and start
 * copy-on-write at one instant), the backup reads the images, then
 * {@linkcode Snapshots.destroy}. The CBT maps live on in the trackers.
 *
 * Errors, as the module returns them: unknown id ESRCH (ENODEV for destroy,
 * as `snapshot_destroy` does), take twice EALREADY, take with no devices
 * ENODEV, add to a taken snapshot EBUSY, device already in this snapshot
 * EALREADY, in another one EBUSY, device holding the storage EBUSY, limit of
 * zero EINVAL, missing storage path ENOENT.
 *
 * Control operations are serialised; waiting for events is not.
 *
 * @module
 */

import { DiffArea } from "./diff_area.ts";
import { DiffStorage, type DiffStorageOpener } from "./diff_storage.ts";
import { assert, BlksnapError } from "./errors.ts";
import { EventQueue, type SnapshotEvent } from "./event_queue.ts";
import type { Params } from "./params.ts";
import type { Tracker } from "./tracker.ts";

/** Options of {@linkcode Snapshots}. */
export interface SnapshotsOptions {
  readonly params: Params;
  /** Opens difference storages; default: the native opener. */
  readonly opener?: DiffStorageOpener;
  /** Receives diagnostics (warnings of freeze and thaw, overflows…). */
  readonly log?: (message: string) => void;
}

/** Options of {@linkcode Snapshots.create}. */
export interface CreateOptions {
  /** A regular file, a directory or a block device. */
  readonly diffStoragePath: string;
  /** The most sectors the difference storage may grow to. */
  readonly limitSectors: number;
}

/** Hooks around the instant of a take, e.g. to freeze and thaw filesystems. */
export interface TakeHooks {
  /** Called for each device before the switch; a failure is only a warning. */
  readonly freeze?: (tracker: Tracker) => Promise<void>;
  /** Called for each device after the switch; a failure is only a warning. */
  readonly thaw?: (tracker: Tracker) => Promise<void>;
}

class Snapshot {
  readonly id: string;
  readonly storage: DiffStorage;
  readonly events: EventQueue;
  readonly trackers: Tracker[] = [];
  isTaken = false;

  constructor(id: string, storage: DiffStorage, events: EventQueue) {
    this.id = id;
    this.storage = storage;
    this.events = events;
  }
}

/** The registry of snapshots (the module's global `snapshots` list). */
export class Snapshots {
  readonly params: Params;
  readonly #opener: DiffStorageOpener | undefined;
  readonly #log: (message: string) => void;
  readonly #snapshots = new Map<string, Snapshot>();
  #control: Promise<unknown> = Promise.resolve();

  constructor(options: SnapshotsOptions) {
    this.params = options.params;
    this.#opener = options.opener;
    const log = options.log ?? (() => {});
    // A log that throws (stderr closed…) must not fail a take, a destroy or a write.
    this.#log = (message) => {
      try {
        log(message);
      } catch {
        // dropped: there is no other place to say it
      }
    };
  }

  /** `snapshot_create`: opens the difference storage; returns the new snapshot's UUID. */
  create(options: CreateOptions): Promise<string> {
    return this.#serialised(async () => {
      const { diffStoragePath, limitSectors } = options;
      if (!Number.isSafeInteger(limitSectors) || limitSectors <= 0) {
        throw new BlksnapError(
          "EINVAL",
          `The difference storage limit must be a positive number of sectors, not ${limitSectors}`,
        );
      }
      if (diffStoragePath === "") {
        throw new BlksnapError("EINVAL", "The difference storage path is empty");
      }
      const events = new EventQueue();
      const storage = await DiffStorage.open({
        path: diffStoragePath,
        limitSectors,
        params: this.params,
        onEvent: (event) => events.push(event),
        log: this.#log,
        ...(this.#opener === undefined ? {} : { opener: this.#opener }),
      });
      const id = crypto.randomUUID();
      this.#snapshots.set(id, new Snapshot(id, storage, events));
      return id;
    });
  }

  /** `snapshot_add_device`. */
  addDevice(id: string, tracker: Tracker): Promise<void> {
    return this.#serialised(() => {
      const snapshot = this.#get(id, "ESRCH");
      if (snapshot.isTaken) {
        throw new BlksnapError("EBUSY", `Snapshot ${id} is already taken: no device can join it`);
      }
      if (tracker.deviceIds.has(snapshot.storage.deviceId)) {
        throw new BlksnapError(
          "EBUSY",
          `The device "${tracker.deviceId}" holds the difference storage of snapshot ${id}`,
        );
      }
      if (snapshot.trackers.includes(tracker)) {
        throw new BlksnapError("EALREADY", `"${tracker.deviceId}" is already in snapshot ${id}`);
      }
      if (tracker.snapshotId !== null) {
        throw new BlksnapError(
          "EBUSY",
          `"${tracker.deviceId}" is already in snapshot ${tracker.snapshotId}`,
        );
      }
      assert(!tracker.isTaken, "A device outside any snapshot has a snapshot taken");
      tracker.snapshotId = id;
      snapshot.trackers.push(tracker);
      return Promise.resolve();
    });
  }

  /**
   * `snapshot_take`: makes a difference area per device, freezes, quiesces
   * every device, switches them all at once, resumes, thaws.
   */
  take(id: string, hooks: TakeHooks = {}): Promise<void> {
    return this.#serialised(async () => {
      const snapshot = this.#get(id, "ESRCH");
      if (snapshot.isTaken) throw new BlksnapError("EALREADY", `Snapshot ${id} is already taken`);
      if (snapshot.trackers.length === 0) {
        throw new BlksnapError("ENODEV", `Snapshot ${id} has no devices`);
      }
      const areas = snapshot.trackers.map((tracker) =>
        new DiffArea({
          device: tracker.device,
          storage: snapshot.storage,
          params: this.params,
          log: this.#log,
          onCorrupted: (errorCode) => {
            snapshot.events.push({
              code: "corrupted",
              timeMs: Date.now(),
              deviceId: tracker.deviceId,
              errorCode: -errorCode,
            });
            this.#log(`Snapshot ${id} of "${tracker.deviceId}" is corrupted: ${errorCode}`);
          },
        })
      );
      for (const tracker of snapshot.trackers) {
        await this.#hook(hooks.freeze, tracker, "freeze");
      }
      // Every device stops admitting writes at once, then drains.
      const draining = snapshot.trackers.map((tracker) => tracker.quiesce());
      try {
        await Promise.all(draining);
        // The instant of the snapshot: no await until every device switched.
        snapshot.trackers.forEach((tracker, i) => tracker.takeSnapshot(areas[i]!));
        snapshot.isTaken = true;
      } finally {
        for (const tracker of snapshot.trackers) tracker.resume();
        for (const tracker of snapshot.trackers) {
          await this.#hook(hooks.thaw, tracker, "thaw");
        }
      }
    });
  }

  /**
   * `snapshot_destroy`: the images go, copy-on-write stops, the difference
   * storage is closed (an unnamed one disappears). CBT maps stay. I/O still
   * in flight on the difference storage is waited for, even after the stall
   * watchdog gave up on it: a storage that never answers holds the destroy.
   */
  destroy(id: string): Promise<void> {
    return this.#serialised(async () => {
      const snapshot = this.#get(id, "ENODEV");
      this.#snapshots.delete(id);
      snapshot.events.close();
      for (const tracker of snapshot.trackers) {
        tracker.snapshotId = null;
        await tracker.releaseSnapshot();
      }
      await snapshot.storage.close();
    });
  }

  /** `snapshot_collect`: the ids of every snapshot, oldest first. */
  collect(): string[] {
    return [...this.#snapshots.keys()];
  }

  /** Whether the snapshot `id` exists and is taken. */
  isTaken(id: string): boolean {
    return this.#get(id, "ESRCH").isTaken;
  }

  /** The devices of snapshot `id`. */
  trackers(id: string): readonly Tracker[] {
    return [...this.#get(id, "ESRCH").trackers];
  }

  /** The difference storage of snapshot `id`. */
  storage(id: string): DiffStorage {
    return this.#get(id, "ESRCH").storage;
  }

  /**
   * `snapshot_wait_event`: the next event of snapshot `id`, waiting up to
   * `timeoutMs`; null on timeout or when the snapshot is destroyed meanwhile.
   */
  async waitEvent(id: string, timeoutMs: number): Promise<SnapshotEvent | null> {
    if (!Number.isSafeInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 2 ** 32 - 1) {
      throw new BlksnapError("EINVAL", `Bad timeout ${timeoutMs}`);
    }
    return await this.#get(id, "ESRCH").events.wait(timeoutMs);
  }

  /** Destroys every snapshot (the daemon's shutdown). */
  async destroyAll(): Promise<void> {
    for (const id of this.collect()) await this.destroy(id);
  }

  #get(id: string, code: "ESRCH" | "ENODEV"): Snapshot {
    const snapshot = this.#snapshots.get(id.toLowerCase());
    if (snapshot === undefined) throw new BlksnapError(code, `Snapshot ${id} not found`);
    return snapshot;
  }

  async #hook(
    hook: ((tracker: Tracker) => Promise<void>) | undefined,
    tracker: Tracker,
    what: string,
  ): Promise<void> {
    if (hook === undefined) return;
    try {
      await hook(tracker);
    } catch (error) {
      this.#log(`Failed to ${what} "${tracker.deviceId}": ${(error as Error).message}`);
    }
  }

  #serialised<T>(operation: () => Promise<T>): Promise<T> {
    const result = this.#control.then(operation, operation);
    this.#control = result.catch(() => {});
    return result;
  }
}
