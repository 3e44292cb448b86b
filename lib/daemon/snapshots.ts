/**
 * The daemon's snapshots: create, add, take, destroy, collect, info and
 * events, over the tracked devices' pipelines (lib/daemon/pipe.ts).
 *
 * Life of a snapshot: created with a difference storage (opened at once, so
 * a bad path fails early) and devices; taken once (the filesystems on its
 * tracked devices are frozen, every device's write gate closes and drains,
 * copy-on-write is armed on all of them at that one instant, the gates open,
 * the filesystems thaw; then one image device per tracked device is made and
 * a store worker moves copied chunks to the storage); destroyed (refused
 * while an image is mounted; images removed, copy-on-write stopped, the gate
 * drained once more so no request uses the pool, the store worker stopped,
 * memory freed, the storage closed — an unnamed file disappears).
 *
 * Every operation on one snapshot runs alone (a per-snapshot chain), and an
 * operation fails with no change of state.
 */
import type { Libc } from "../../ffi/libc.ts";
import { BlksnapError, ERRNO } from "../../ffi/errno.ts";
import { EventQueue, type SnapshotEvent } from "../engine/event_queue.ts";
import type { Params } from "../engine/params.ts";
import { CTL, CTL_F, LANE } from "../pipeline/device_ctl.ts";
import { SF, STORAGE_KIND, STORAGE_KIND_NAMES, StorageCtl, SW } from "../pipeline/storage_ctl.ts";
import type { StoreWorkerInit, StoreWorkerReport } from "../pipeline/store_worker.ts";
import type { UblkControl } from "../ublk/control.ts";
import { UblkDevice } from "../ublk/device.ts";
import { Waker } from "../ublk/targets/waker.ts";
import { EFD_CLOEXEC } from "../../ffi/libc.ts";
import { identifyBlockDevice, openExclusive, ublkParams } from "./block_device.ts";
import { encodeOwnerTag } from "./owner_tag.ts";
import { freezeAll, thawAll } from "./freeze.ts";
import type { DevicePipe } from "./pipe.ts";
import {
  directIoRefusal,
  type OpenStorage,
  openStorage,
  setDirectIo,
  storageBlockSize,
} from "./storage.ts";

/** What the registry needs of a tracked device. */
export interface SnapshotDevice {
  original: string;
  originalKey: string;
  tracked: string;
  trackedKey: string;
  originalFd: number;
  sizeBytes: number;
  logicalBlockSize: number;
  physicalBlockSize: number;
  pipe: DevicePipe;
  /** The snapshot it belongs to, or null. Set and cleared by the registry. */
  snapshotId: string | null;
}

/** What the registry needs of the daemon. */
export interface SnapshotHost {
  libc: Libc;
  ctrl: UblkControl;
  params: Params;
  queues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  /**
   * The tracked device for a path, attaching it when `attach` and it is not
   * tracked (then `attached` is true, and a failure must `release` it).
   */
  device(
    path: string,
    verb: string,
    attach: boolean,
  ): Promise<{ device: SnapshotDevice; attached: boolean }>;
  /** Detaches a device this request attached, when the request fails. */
  release(device: SnapshotDevice): Promise<void>;
  log(message: string): void;
}

interface Image {
  device: UblkDevice;
  path: string;
}

interface Snapshot {
  id: string;
  devices: SnapshotDevice[];
  storage: OpenStorage;
  limitSectors: number;
  createdAt: string;
  takenAt: string | null;
  storageCtl: StorageCtl | null;
  store: Worker | null;
  storeExited: Promise<void> | null;
  storeWakeFd: number;
  /** The storage is used with O_DIRECT (decided at the take). */
  directIo: boolean;
  images: Map<string, Image>;
  events: EventQueue;
  reported: Set<string>;
  /** Per device: the pool's release count and when it last moved while requests waited. */
  progress: Map<string, { releases: number; since: number }>;
  poller: ReturnType<typeof setInterval> | null;
  chain: Promise<unknown>;
  destroyed: boolean;
}

const STORE_WORKER_URL = new URL("../../workers/store_worker.ts", import.meta.url).href;
const DRAIN_TIMEOUT_MS = 30_000;
const STORE_TIMEOUT_MS = 60_000;

export class Snapshots {
  readonly #host: SnapshotHost;
  readonly #snaps = new Map<string, Snapshot>();
  readonly #waker: Waker;

  constructor(host: SnapshotHost) {
    this.#host = host;
    this.#waker = new Waker(host.libc);
  }

  get size(): number {
    return this.#snaps.size;
  }

  async create(args: {
    devices: string[];
    storage: string;
    limitBytes: number;
    clientPid?: number;
  }): Promise<{ id: string }> {
    if (!(args.limitBytes > 0)) {
      throw new BlksnapError(
        "EINVAL",
        "The difference storage limit must be more than 0 (e.g. --limit 1G)",
      );
    }
    const limitSectors = Math.floor(args.limitBytes / 512);
    if (limitSectors < 1) throw new BlksnapError("EINVAL", "The limit is less than one sector");
    // The storage first (a bad path fails before anything is attached), then
    // the devices; a failure detaches what this request attached.
    const storage = openStorage(this.#host.libc, args.storage, args.clientPid);
    const devices: SnapshotDevice[] = [];
    const attached: SnapshotDevice[] = [];
    try {
      for (const path of args.devices) {
        const { device: d, attached: fresh } = await this.#host.device(
          path,
          "add to a snapshot",
          true,
        );
        if (fresh) attached.push(d);
        if (devices.includes(d)) {
          throw new BlksnapError("EALREADY", `"${path}" is given twice`);
        }
        this.#checkFree(d, path);
        this.#checkStorage(storage, d);
        devices.push(d);
      }
    } catch (err) {
      this.#host.libc.close(storage.fd);
      for (const d of attached) {
        await this.#host.release(d).catch((e) => this.#host.log(`undoing attach failed: ${e}`));
      }
      throw err;
    }
    const id = crypto.randomUUID();
    const snap: Snapshot = {
      id,
      devices,
      storage,
      limitSectors,
      createdAt: new Date().toISOString(),
      takenAt: null,
      storageCtl: null,
      store: null,
      storeExited: null,
      storeWakeFd: -1,
      directIo: false,
      images: new Map(),
      events: new EventQueue(),
      reported: new Set(),
      progress: new Map(),
      poller: null,
      chain: Promise.resolve(),
      destroyed: false,
    };
    for (const d of devices) d.snapshotId = id;
    this.#snaps.set(id, snap);
    this.#host.log(
      `snapshot ${id} created: ${devices.map((d) => d.original).join(", ") || "no devices"}, ` +
        `storage ${storage.path} (${
          STORAGE_KIND_NAMES[storage.kind]
        }), limit ${limitSectors} sectors`,
    );
    return { id };
  }

  add(id: string, path: string) {
    return this.#serial(id, async (snap) => {
      if (snap.takenAt !== null) {
        throw new BlksnapError("EBUSY", `Snapshot ${id} is already taken: no device can join it`);
      }
      const { device: d, attached } = await this.#host.device(path, "add to a snapshot", true);
      try {
        if (snap.devices.includes(d)) {
          throw new BlksnapError("EALREADY", `"${path}" is already in snapshot ${id}`);
        }
        this.#checkFree(d, path);
        this.#checkStorage(snap.storage, d);
      } catch (err) {
        if (attached) {
          await this.#host.release(d).catch((e) => this.#host.log(`undoing attach failed: ${e}`));
        }
        throw err;
      }
      snap.devices.push(d);
      d.snapshotId = id;
      return { id, device: d.original, tracked: d.tracked };
    });
  }

  take(id: string) {
    return this.#serial(id, async (snap) => {
      if (snap.takenAt !== null) {
        throw new BlksnapError("EALREADY", `Snapshot ${id} is already taken`);
      }
      if (snap.devices.length === 0) {
        throw new BlksnapError("ENODEV", `Snapshot ${id} has no devices: add one first`);
      }
      return await this.#take(snap);
    });
  }

  /** `force`: even with a mounted image (shutdown, or one of its devices failed). */
  destroy(id: string, force = false) {
    return this.#serial(id, async (snap) => {
      await this.#destroy(snap, force);
      return { id };
    });
  }

  /** The ublk ids of every image device. */
  ublkIds(): number[] {
    return [...this.#snaps.values()].flatMap((s) =>
      [...s.images.values()].map((i) => i.device.devId)
    );
  }

  collect(): { ids: string[] } {
    return { ids: [...this.#snaps.keys()] };
  }

  info(d: SnapshotDevice): { id: string | null; errorCode: number; image: string } {
    const snap = d.snapshotId === null ? undefined : this.#snaps.get(d.snapshotId);
    return {
      id: d.snapshotId,
      errorCode: snap?.takenAt ? Atomics.load(d.pipe.ctl.w, CTL.ERROR) : 0,
      image: snap?.images.get(d.originalKey)?.path ?? "",
    };
  }

  async waitEvent(id: string, timeoutMs: number): Promise<unknown> {
    const snap = this.#get(id);
    this.#poll(snap);
    const event = await snap.events.wait(timeoutMs);
    if (event === null) {
      if (snap.destroyed) throw new BlksnapError("ESRCH", `Snapshot ${id} was destroyed`);
      return { result: "timeout" };
    }
    return eventResult(event);
  }

  status() {
    return [...this.#snaps.values()].map((s) => {
      const st = s.storageCtl;
      return {
        id: s.id,
        taken: s.takenAt !== null,
        createdAt: s.createdAt,
        takenAt: s.takenAt,
        errorCode: s.devices.reduce((e, d) => e || Atomics.load(d.pipe.ctl.w, CTL.ERROR), 0),
        devices: s.devices.map((d) => ({
          original: d.original,
          tracked: d.tracked,
          image: s.images.get(d.originalKey)?.path ?? null,
          errorCode: s.takenAt ? Atomics.load(d.pipe.ctl.w, CTL.ERROR) : 0,
          chunkBytes: d.pipe.chunkBytes,
          copiedChunks: d.pipe.ctl.counter(LANE.COW_LOADS),
          storedChunks: d.pipe.ctl.f[CTL_F.STORED]!,
          parked: d.pipe.ctl.counter(LANE.PARKED),
          imageReads: d.pipe.ctl.counter(LANE.IMAGE_READS),
          imageWrites: d.pipe.ctl.counter(LANE.IMAGE_WRITES),
          buffersInUse: d.pipe.pool.inUse,
          buffersPeak: d.pipe.pool.peak,
        })),
        storage: {
          path: s.storage.path,
          kind: STORAGE_KIND_NAMES[s.storage.kind],
          io: s.directIo ? "direct" : "buffered",
          capacityBytes:
            (st ? st.capacitySectors : Math.min(s.storage.sizeBytes / 512, s.limitSectors)) *
            512,
          filledBytes: (st?.filledSectors ?? 0) * 512,
          limitBytes: s.limitSectors * 512,
        },
      };
    });
  }

  /** Destroys every snapshot (daemon shutdown). */
  async destroyAll(): Promise<void> {
    for (const id of [...this.#snaps.keys()]) {
      try {
        await this.#serial(id, (snap) => this.#destroy(snap, true));
      } catch (err) {
        this.#host.log(`destroying snapshot ${id} failed: ${err}`);
      }
    }
  }

  // ---- internals ----

  #get(id: string): Snapshot {
    const snap = this.#snaps.get(id);
    if (snap === undefined || snap.destroyed) {
      throw new BlksnapError("ESRCH", `Snapshot ${id} not found`);
    }
    return snap;
  }

  #serial<T>(id: string, op: (snap: Snapshot) => Promise<T>): Promise<T> {
    const snap = this.#get(id);
    const run = snap.chain.then(() => {
      if (snap.destroyed) throw new BlksnapError("ESRCH", `Snapshot ${id} not found`);
      return op(snap);
    });
    snap.chain = run.catch(() => {});
    return run;
  }

  #checkFree(d: SnapshotDevice, path: string): void {
    if (d.snapshotId !== null) {
      throw new BlksnapError(
        "EBUSY",
        `"${path}" is already in snapshot ${d.snapshotId}: destroy that one first`,
      );
    }
  }

  #checkStorage(storage: OpenStorage, d: SnapshotDevice): void {
    if (storage.deviceKey === d.originalKey || storage.deviceKey === d.trackedKey) {
      throw new BlksnapError(
        "EBUSY",
        `The difference storage "${storage.path}" is on ${d.tracked} (${d.original}), ` +
          `which is in the snapshot: put it on another device`,
      );
    }
  }

  /**
   * A block-device storage is used with O_DIRECT where every request fits its
   * logical block size: the copies go to the device, not through its page
   * cache (a copy of every chunk, and writeback that throttles the store
   * worker), as dm-snapshot's COW bios do. BLKSNAP_STORAGE_DIRECT=0 keeps it
   * buffered. Set (or cleared: devices may have been added since a take that
   * failed) before any I/O of the take.
   */
  #chooseStorageIo(snap: Snapshot, unitBytes: number): void {
    const libc = this.#host.libc;
    let direct = false;
    if (snap.storage.kind === STORAGE_KIND.BLOCKDEV) {
      const refusal = Deno.env.get("BLKSNAP_STORAGE_DIRECT") === "0"
        ? "BLKSNAP_STORAGE_DIRECT=0"
        : directIoRefusal(
          storageBlockSize(libc, snap.storage.fd),
          unitBytes,
          snap.devices.map((d) => ({
            path: d.original,
            logicalBlockSize: d.logicalBlockSize,
            chunkBytes: d.pipe.chunkBytes,
          })),
        );
      direct = refusal === null;
      if (refusal !== null) {
        this.#host.log(`snapshot ${snap.id}: storage ${snap.storage.path} buffered: ${refusal}`);
      }
    }
    if (snap.storage.kind === STORAGE_KIND.BLOCKDEV) setDirectIo(libc, snap.storage.fd, direct);
    snap.directIo = direct;
  }

  async #take(snap: Snapshot) {
    const host = this.#host;
    const libc = host.libc;
    const unitShift = snap.devices.every((d) => d.pipe.chunkBytes >= 4096) ? 3 : 0;
    // Offsets are 32-bit counts of units: past that the storage is no use.
    const limitSectors = Math.min(snap.limitSectors, (2 ** 32 - 1) * 2 ** unitShift);
    const capacity = Math.min(snap.storage.sizeBytes / 512, limitSectors);
    const st = StorageCtl.create({
      kind: snap.storage.kind,
      capacitySectors: Math.floor(capacity / 2 ** unitShift) * 2 ** unitShift,
      limitSectors,
      growthSectors: host.params.diffStorageMinimumSectors,
      unitShift,
    });
    this.#chooseStorageIo(snap, 512 << unitShift);
    snap.storeWakeFd = libc.check(libc.sym.eventfd(0, EFD_CLOEXEC), "eventfd");
    snap.storageCtl = st;
    const warnings: string[] = [];
    let armed = false;
    try {
      // 1. the store worker, which allocates the storage's first portion now,
      // not under the first copies after the take
      await this.#startStore(snap, st);
      // 2. every device arms copy-on-write at one instant, with writes drained.
      // Nothing is logged while filesystems are frozen: the log may be on one.
      const frozen = freezeAll(
        libc,
        snap.devices.map((d) => d.trackedKey),
        (m) => warnings.push(m),
      );
      try {
        await injectedFrozenPause();
        for (const d of snap.devices) d.pipe.ctl.closeGate();
        try {
          const drained = await Promise.all(
            snap.devices.map((d) => d.pipe.ctl.drained(DRAIN_TIMEOUT_MS)),
          );
          const stuck = snap.devices.filter((_, i) => !drained[i]);
          if (stuck.length > 0) {
            throw new BlksnapError(
              "ETIMEDOUT",
              `Writes to ${
                stuck.map((d) => d.tracked).join(", ")
              } did not drain in ${DRAIN_TIMEOUT_MS} ms`,
            );
          }
          const done: SnapshotDevice[] = [];
          try {
            for (const d of snap.devices) {
              d.pipe.arm({ fd: snap.storage.fd, storeWakeFd: snap.storeWakeFd, unitShift });
              done.push(d);
            }
          } catch (err) {
            for (const d of done) d.pipe.disarm(true);
            throw err;
          }
          // Only now, when nothing can fail any more: the CBT maps switch.
          for (const d of snap.devices) {
            if (d.pipe.cbt.isCorrupted) d.pipe.cbt.resetInPlace();
            d.pipe.cbt.switch();
          }
          armed = true;
        } finally {
          for (const d of snap.devices) {
            d.pipe.ctl.openGate();
            d.pipe.wakeAll();
          }
        }
      } finally {
        thawAll(libc, frozen, (m) => warnings.push(m));
        for (const m of warnings) host.log(m);
      }
      snap.takenAt = new Date().toISOString();
      // 3. the images (the devices already copy on write)
      for (const d of snap.devices) {
        d.pipe.setImageQueues(true);
        const device = await UblkDevice.create(host.ctrl, libc, {
          queues: host.queues,
          depth: host.queueDepth,
          maxIoBufBytes: host.maxIoBufBytes,
          params: ublkParams(
            {
              sizeBytes: d.sizeBytes,
              logicalBlockSize: d.logicalBlockSize,
              physicalBlockSize: d.physicalBlockSize,
            },
            host.maxIoBufBytes,
            { writeCache: false },
          ),
          target: {
            kind: "image",
            originalFd: d.originalFd,
            storageFd: snap.storage.fd,
            device: d.pipe.shared,
            wakeFds: d.pipe.imageWakeFds,
          },
          recovery: false,
          ownerTag: encodeOwnerTag({ role: "image", originalDevice: d.originalKey }),
          onFatal: (message) => {
            host.log(`image of ${d.original} failed: ${message}`);
            // Its parked requests and claimed chunks are lost: the snapshot of the device too.
            d.pipe.ctl.corrupt(-ERRNO.EIO);
            d.pipe.wakeAll();
          },
        });
        snap.images.set(d.originalKey, { device, path: device.blockPath });
      }
    } catch (err) {
      if (armed) {
        host.log(`take of ${snap.id} failed, undoing it: ${err}`);
        await this.#teardown(snap).catch((e) => host.log(`undoing the take failed: ${e}`));
      } else {
        await this.#stopStore(snap).catch((e) =>
          host.log(`stopping the store worker failed: ${e}`)
        );
        libc.close(snap.storeWakeFd);
        snap.storeWakeFd = -1;
      }
      snap.takenAt = null;
      snap.storageCtl = null;
      throw err;
    }
    snap.poller = setInterval(() => this.#poll(snap), 200);
    host.log(
      `snapshot ${snap.id} taken: ${
        snap.devices.map((d) => `${d.original} -> ${snap.images.get(d.originalKey)?.path}`).join(
          ", ",
        )
      }`,
    );
    return {
      id: snap.id,
      images: snap.devices.map((d) => ({
        original: d.original,
        tracked: d.tracked,
        image: snap.images.get(d.originalKey)!.path,
      })),
    };
  }

  async #startStore(snap: Snapshot, st: StorageCtl): Promise<void> {
    const worker = new Worker(STORE_WORKER_URL, { type: "module", name: `store-${snap.id}` });
    snap.store = worker;
    let onExit!: () => void;
    snap.storeExited = new Promise<void>((r) => (onExit = r));
    // A store worker that dies leaves every loaded chunk IN_MEMORY: the snapshot
    // is lost, and whatever waits for a buffer or a store must go on.
    const died = (message: string, reject: (e: Error) => void) => {
      this.#host.log(`store worker of ${snap.id} failed: ${message}`);
      for (const d of snap.devices) {
        d.pipe.ctl.corrupt(-ERRNO.EIO);
        d.pipe.wakeAll();
      }
      reject(new BlksnapError("EIO", `The store worker failed: ${message.split("\n")[0]}`));
      onExit();
    };
    const ready = new Promise<void>((resolve, reject) => {
      worker.onmessage = (ev: MessageEvent<StoreWorkerReport>) => {
        const r = ev.data;
        if (r.type === "ready") resolve();
        else if (r.type === "exited") onExit();
        else died(r.message, reject);
      };
      worker.onerror = (ev) => {
        ev.preventDefault();
        died(ev.message, reject);
      };
    });
    const init: StoreWorkerInit = {
      type: "init",
      storageFd: snap.storage.fd,
      wakeFd: snap.storeWakeFd,
      storage: st.shared,
      devices: snap.devices.map((d) => ({
        ctl: d.pipe.shared.ctl,
        chunks: d.pipe.shared.chunks,
        pool: d.pipe.shared.pool,
        rings: [...d.pipe.shared.trackedRings, ...d.pipe.shared.imageRings],
      })),
    };
    worker.postMessage(init);
    await ready;
  }

  /**
   * Refuses while an image is in use (unless `force`: shutdown, or a device
   * that failed), then tears the snapshot down and forgets it.
   */
  async #destroy(snap: Snapshot, force = false): Promise<void> {
    const libc = this.#host.libc;
    const guards: number[] = [];
    const closeGuards = () => {
      for (const fd of guards.splice(0)) libc.close(fd);
    };
    try {
      for (const [, image] of snap.images) {
        try {
          const verb = "destroy the snapshot with image";
          guards.push(openExclusive(libc, identifyBlockDevice(image.path, verb), verb));
        } catch (err) {
          if (!force) throw err;
        }
      }
      await this.#teardown(snap, closeGuards);
    } finally {
      closeGuards();
    }
    snap.destroyed = true;
    snap.events.close();
    for (const d of snap.devices) d.snapshotId = null;
    libc.close(snap.storage.fd);
    this.#snaps.delete(snap.id);
    this.#host.log(`snapshot ${snap.id} destroyed`);
  }

  /**
   * Images away, copy-on-write off, store worker stopped, memory freed. The
   * gates always open again, whatever fails; a device whose writes do not
   * drain keeps its take's memory (leaked, never unmapped under a request).
   */
  async #teardown(snap: Snapshot, afterImagesStop?: () => void): Promise<void> {
    const host = this.#host;
    if (snap.poller !== null) clearInterval(snap.poller);
    snap.poller = null;
    const errors: unknown[] = [];
    let first = true;
    for (const [key, image] of snap.images) {
      try {
        // The guards of every image close once the first is stopped (as detach does).
        await image.device.destroy(first ? afterImagesStop : undefined);
      } catch (err) {
        errors.push(err);
      }
      first = false;
      snap.images.delete(key);
    }
    afterImagesStop?.();
    for (const d of snap.devices) d.pipe.setImageQueues(false);
    const armed = snap.devices.filter((d) => d.pipe.armed);
    for (const d of armed) {
      d.pipe.ctl.closeGate();
      d.pipe.stopCow();
    }
    try {
      const drained = await Promise.all(armed.map((d) => d.pipe.ctl.drained(DRAIN_TIMEOUT_MS)));
      armed.forEach((d, i) => {
        if (!drained[i]) {
          errors.push(new BlksnapError("ETIMEDOUT", `Writes to ${d.tracked} did not drain`));
          host.log(`writes to ${d.tracked} did not drain: its snapshot memory is leaked`);
        }
      });
      try {
        await this.#stopStore(snap);
      } catch (err) {
        errors.push(err);
        drained.fill(false); // it may still write from the pool
      }
      armed.forEach((d, i) => d.pipe.disarm(drained[i]!));
    } finally {
      for (const d of armed) {
        d.pipe.ctl.openGate();
        d.pipe.wakeAll();
      }
      if (snap.storeWakeFd >= 0) host.libc.close(snap.storeWakeFd);
      snap.storeWakeFd = -1;
      snap.takenAt = null;
    }
    if (errors.length > 0) throw errors[0];
  }

  /**
   * Invariant 3: the snapshot machinery never stalls writes. Requests that
   * wait (for a buffer, or a chunk another queue loads) while nothing is
   * stored or released for cow_stall_timeout_ms corrupt the device's part of
   * the snapshot (-EIO); copy-on-write stops and they go through.
   */
  #watch(snap: Snapshot): void {
    const now = Date.now();
    for (const d of snap.devices) {
      const releases = d.pipe.pool.releases;
      const seen = snap.progress.get(d.originalKey);
      if (d.pipe.ctl.waiters > 0 && d.pipe.ctl.error !== 0) {
        d.pipe.wakeAll(); // nothing to wait for any more: let them go (they fail or pass through)
        continue;
      }
      if (d.pipe.ctl.waiters === 0 || seen === undefined || seen.releases !== releases) {
        snap.progress.set(d.originalKey, { releases, since: now });
        continue;
      }
      if (now - seen.since >= this.#host.params.cowStallTimeoutMs && d.pipe.ctl.error === 0) {
        this.#host.log(
          `snapshot ${snap.id}: copy-on-write of ${d.original} made no progress for ` +
            `${now - seen.since} ms with requests waiting: corrupting it so that writes go on`,
        );
        d.pipe.ctl.corrupt(-ERRNO.EIO);
        d.pipe.wakeAll();
      }
    }
  }

  /** Stops the store worker once its rings are empty; throws when it does not stop. */
  async #stopStore(snap: Snapshot): Promise<void> {
    if (snap.store === null || snap.storageCtl === null) return;
    Atomics.store(snap.storageCtl.w, SW.STOP, 1);
    this.#waker.wake(snap.storeWakeFd);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const exited = await Promise.race([
      snap.storeExited!.then(() => true),
      new Promise<boolean>((r) => (timer = setTimeout(() => r(false), STORE_TIMEOUT_MS))),
    ]);
    clearTimeout(timer);
    snap.store.terminate();
    snap.store = null;
    if (!exited) throw new BlksnapError("ETIMEDOUT", "The store worker did not stop");
  }

  /** Turns what the workers flagged in shared memory into events; watches for stalls. */
  #poll(snap: Snapshot): void {
    if (snap.takenAt === null) return;
    this.#watch(snap);
    for (const d of snap.devices) {
      const error = Atomics.load(d.pipe.ctl.w, CTL.ERROR);
      if (error !== 0 && !snap.reported.has(d.originalKey)) {
        snap.reported.add(d.originalKey);
        this.#host.log(`snapshot ${snap.id}: ${d.original} corrupted (${error})`);
        snap.events.push({
          code: "corrupted",
          timeMs: Date.now(),
          deviceId: d.originalKey,
          errorCode: -error,
        });
      }
    }
    const st = snap.storageCtl;
    if (st !== null && Atomics.load(st.w, SW.NO_SPACE) !== 0 && !snap.reported.has("no_space")) {
      snap.reported.add("no_space");
      snap.events.push({
        code: "no_space",
        timeMs: st.f[SF.NO_SPACE_TIME]!,
        requestedSectors: st.f[SF.NO_SPACE_REQUESTED]!,
      });
    }
  }
}

function eventResult(event: SnapshotEvent) {
  if (event.code === "corrupted") {
    return {
      result: "ok",
      time: event.timeMs,
      event: "corrupted",
      code: 0,
      device: event.deviceId,
      errorCode: event.errorCode,
    };
  }
  return {
    result: "ok",
    time: event.timeMs,
    event: "no_space",
    code: 1,
    requestedSectors: event.requestedSectors,
  };
}

/**
 * Fault injection for the VM tests: a take holds its filesystems frozen this
 * long before it goes on (BLKSNAP_FAULT_TAKE_FROZEN_MS; unset: not at all),
 * so that a test can kill the daemon while they are frozen.
 */
async function injectedFrozenPause(): Promise<void> {
  const ms = Number(Deno.env.get("BLKSNAP_FAULT_TAKE_FROZEN_MS") ?? "0");
  if (Number.isSafeInteger(ms) && ms > 0) await new Promise((r) => setTimeout(r, ms));
}
