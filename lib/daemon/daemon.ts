/**
 * The daemon's state and request handlers: the ublk control plane and the
 * tracked devices. Every state change happens here, on the main thread; the
 * socket server (server.ts) only parses and forwards.
 */
import type { Libc } from "../../ffi/libc.ts";
import type { LiburingSymbols } from "../../ffi/liburing.ts";
import { describeFeatures, UblkControl } from "../ublk/control.ts";
import { UblkDevice } from "../ublk/device.ts";
import { VERSION } from "../version.ts";
import type { Params } from "../engine/params.ts";
import {
  type BlockDeviceId,
  blockDeviceId,
  type Geometry,
  identifyBlockDevice,
  openExclusive,
  openOriginal,
  readGeometry,
  ublkParams,
} from "./block_device.ts";
import { devTKey } from "../dev_t.ts";
import { type ArgsOf, PROTOCOL_VERSION, type SectorRange, type TrackedInfo } from "./protocol.ts";
import { BlksnapError, ERRNO } from "../../ffi/errno.ts";
import { DevicePipe } from "./pipe.ts";
import { type SnapshotDevice, Snapshots } from "./snapshots.ts";
import { Buffer } from "node:buffer";

export interface DaemonOptions {
  params: Params;
  queues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  socketPath: string;
}

export const DEFAULT_DAEMON_OPTIONS: Omit<DaemonOptions, "socketPath" | "params"> = {
  queues: 2,
  queueDepth: 128,
  maxIoBufBytes: 512 * 1024,
};

interface Tracked extends SnapshotDevice {
  info: TrackedInfo;
  device: UblkDevice;
  detaching: boolean;
}

export class Daemon {
  readonly options: DaemonOptions;
  readonly #libc: Libc;
  readonly #ctrl: UblkControl;
  /** By original MAJ:MIN. */
  readonly #tracked = new Map<string, Tracked>();
  /** Original MAJ:MIN being attached right now. */
  readonly #attaching = new Set<string>();
  readonly startedAt = new Date();
  #shuttingDown = false;
  /** Attaches, detaches and removals under way; shutdown waits for them. */
  readonly #inflight = new Set<Promise<unknown>>();
  readonly snapshots: Snapshots;

  private constructor(libc: Libc, ctrl: UblkControl, options: DaemonOptions) {
    this.#libc = libc;
    this.#ctrl = ctrl;
    this.options = options;
    this.snapshots = new Snapshots({
      libc,
      ctrl,
      params: options.params,
      queues: options.queues,
      queueDepth: options.queueDepth,
      maxIoBufBytes: options.maxIoBufBytes,
      device: (path, verb, attach) => this.#deviceFor(path, verb, attach),
      release: async (d) => {
        await this.detach((d as Tracked).info.tracked);
      },
      log,
    });
  }

  /** The tracked device for `path` (original, tracked device or /dev/block/MAJ:MIN). */
  tracked(path: string, verb: string): Tracked {
    const id = identifyBlockDevice(path, verb);
    const t = this.#find(id);
    if (!t || t.detaching) {
      throw new BlksnapError(
        "ENOENT",
        `Cannot ${verb} "${path}": it is not tracked (run "blksnap attach --device ${path}" first)`,
      );
    }
    return t;
  }

  async #deviceFor(
    path: string,
    verb: string,
    attach: boolean,
  ): Promise<{ device: Tracked; attached: boolean }> {
    const id = identifyBlockDevice(path, verb);
    const t = this.#find(id);
    if (t && !t.detaching) return { device: t, attached: false };
    if (!attach) return { device: this.tracked(path, verb), attached: false };
    log(`${path} is not tracked: attaching it to ${verb}`);
    await this.attach(path);
    return { device: this.tracked(path, verb), attached: true };
  }

  cbtInfo(path: string) {
    const t = this.tracked(path, "read the CBT of");
    const info = t.pipe.cbt.info();
    return {
      device: t.info.original,
      tracked: t.info.tracked,
      blockSize: info.blockSizeBytes,
      deviceCapacity: info.deviceCapacityBytes,
      blockCount: info.blockCount,
      generationId: info.generationId,
      changesNumber: info.changesNumber,
    };
  }

  readCbtMap(path: string) {
    const t = this.tracked(path, "read the CBT map of");
    const info = this.cbtInfo(path);
    const map = t.pipe.cbt.read(0, info.blockCount);
    return { ...info, map: Buffer.from(map.buffer, map.byteOffset, map.length).toString("base64") };
  }

  markDirty(path: string, ranges: SectorRange[]) {
    const t = this.tracked(path, "mark dirty blocks of");
    const sectors = t.info.sizeBytes / 512;
    for (const r of ranges) {
      if (r.sector + r.count > sectors) {
        throw new BlksnapError(
          "EINVAL",
          `Range ${r.sector}:${r.count} is past the end of ${t.info.original} (${sectors} sectors)`,
        );
      }
    }
    for (const r of ranges) t.pipe.cbt.markBoth(r.sector, r.count);
    return { device: t.info.original, tracked: t.info.tracked, ranges };
  }

  snapshotCreate(args: ArgsOf<"snapshot_create">) {
    return this.snapshots.create(args);
  }
  snapshotAdd(args: ArgsOf<"snapshot_add">) {
    return this.snapshots.add(args.id, args.device);
  }
  snapshotTake(id: string) {
    return this.snapshots.take(id);
  }
  snapshotDestroy(id: string) {
    return this.snapshots.destroy(id);
  }
  snapshotCollect() {
    return this.snapshots.collect();
  }
  snapshotWaitEvent(id: string, timeoutMs: number) {
    return this.snapshots.waitEvent(id, timeoutMs);
  }

  snapshotInfo(path: string) {
    const t = this.tracked(path, "get the snapshot of");
    return { device: t.info.original, ...this.snapshots.info(t) };
  }

  static async start(libc: Libc, uring: LiburingSymbols, options: DaemonOptions): Promise<Daemon> {
    const ctrl = await UblkControl.open(libc, uring);
    return new Daemon(libc, ctrl, options);
  }

  version() {
    return {
      version: VERSION,
      protocol: PROTOCOL_VERSION,
      pid: Deno.pid,
      ublkFeatures: describeFeatures(this.#ctrl.features),
      ioctlEncoding: this.#ctrl.usesIoctlEncoding,
    };
  }

  /**
   * ublk devices this daemon did not make, e.g. left QUIESCED by a daemon that
   * was killed: I/O to them blocks until they are recovered or removed.
   */
  async foreignDevices(): Promise<
    Array<{ ublkId: number; state: string; pid: number; pidAlive: boolean }>
  > {
    const ours = new Set([
      ...[...this.#tracked.values()].map((t) => t.info.ublkId),
      ...this.snapshots.ublkIds(),
    ]);
    const ids: number[] = [];
    try {
      for (const e of Deno.readDirSync("/sys/class/ublk-char")) {
        const m = /^ublkc(\d+)$/.exec(e.name);
        if (m && !ours.has(Number(m[1]))) ids.push(Number(m[1]));
      }
    } catch {
      return [];
    }
    const out = [];
    for (const id of ids.sort((a, b) => a - b)) {
      try {
        const info = await this.#ctrl.getDevInfo(id);
        const state = ["dead", "live", "quiesced", "fail_io"][info.state] ?? `state ${info.state}`;
        let pidAlive = false;
        try {
          pidAlive = info.ublksrvPid > 0 && Deno.statSync(`/proc/${info.ublksrvPid}`).isDirectory;
        } catch {
          pidAlive = false;
        }
        out.push({ ublkId: id, state, pid: info.ublksrvPid, pidAlive });
      } catch {
        // vanished meanwhile
      }
    }
    return out;
  }

  async status() {
    return {
      ...this.version(),
      foreignDevices: await this.foreignDevices(),
      startedAt: this.startedAt.toISOString(),
      socket: this.options.socketPath,
      params: this.options.params,
      devices: [...this.#tracked.values()].map((t) => {
        const cbt = t.pipe.cbt.info();
        return {
          ...t.info,
          queueStats: t.device.stats(),
          snapshotId: t.snapshotId,
          cbt: {
            blockSize: cbt.blockSizeBytes,
            blockCount: cbt.blockCount,
            generationId: cbt.generationId,
            changesNumber: cbt.changesNumber,
          },
        };
      }),
      snapshots: this.snapshots.status(),
    };
  }

  /** Finds a tracked device by the original's or the tracked device's path or MAJ:MIN. */
  #find(id: BlockDeviceId): Tracked | undefined {
    const byOriginal = this.#tracked.get(id.key);
    if (byOriginal) return byOriginal;
    for (const t of this.#tracked.values()) {
      if (t.info.trackedDevice === id.key) return t;
    }
    return undefined;
  }

  attach(path: string): Promise<TrackedInfo> {
    return this.#track(this.#attach(path));
  }

  detach(path: string): Promise<TrackedInfo> {
    return this.#track(this.#detach(path));
  }

  #track<T>(p: Promise<T>): Promise<T> {
    this.#inflight.add(p);
    const done = () => this.#inflight.delete(p);
    p.then(done, done);
    return p;
  }

  async #attach(path: string): Promise<TrackedInfo> {
    this.#refuseWhenStopping();
    const id = identifyBlockDevice(path, "attach");
    const existing = this.#find(id);
    if (existing) {
      const as = existing.info.trackedDevice === id.key
        ? "is itself the tracked device of"
        : "is already tracked as";
      const other = existing.info.trackedDevice === id.key
        ? existing.info.original
        : existing.info.tracked;
      throw new BlksnapError("EALREADY", `Cannot attach "${path}": it ${as} "${other}"`);
    }
    if (this.#attaching.has(id.key)) {
      throw new BlksnapError("EALREADY", `Cannot attach "${path}": an attach of it is in progress`);
    }
    this.#attaching.add(id.key);
    let fd = -1;
    let device: UblkDevice | undefined;
    let pipe: DevicePipe | undefined;
    try {
      const original = openOriginal(this.#libc, id, "attach");
      fd = original.fd;
      const readOnly = original.readOnly;
      const geo = readGeometry(this.#libc, fd, id);
      validateGeometry(path, geo);
      pipe = new DevicePipe(this.#libc, {
        sizeBytes: geo.sizeBytes,
        minimumIoBytes: Math.max(geo.logicalBlockSize, geo.physicalBlockSize),
        params: this.options.params,
        queues: this.options.queues,
      });
      device = await UblkDevice.create(this.#ctrl, this.#libc, {
        queues: this.options.queues,
        depth: this.options.queueDepth,
        maxIoBufBytes: this.options.maxIoBufBytes,
        params: ublkParams(geo, this.options.maxIoBufBytes, { writeCache: true, readOnly }),
        target: { kind: "tracked", originalFd: fd, device: pipe.shared, wakeFds: pipe.wakeFds },
        recovery: true,
        onFatal: (message) => this.#onQueueFatal(id.key, message),
      });
      const trackedRdev = Deno.statSync(device.blockPath).rdev ?? 0;
      const info: TrackedInfo = {
        original: path,
        originalDevice: id.key,
        tracked: device.blockPath,
        trackedDevice: devTKey(trackedRdev),
        ublkId: device.devId,
        sizeBytes: geo.sizeBytes,
        logicalBlockSize: geo.logicalBlockSize,
        physicalBlockSize: geo.physicalBlockSize,
        queues: device.queues,
        queueDepth: device.depth,
        userRecovery: device.recovery,
        readOnly,
        attachedAt: new Date().toISOString(),
      };
      this.#tracked.set(id.key, {
        info,
        device,
        originalFd: fd,
        detaching: false,
        original: path,
        originalKey: id.key,
        tracked: info.tracked,
        trackedKey: info.trackedDevice,
        sizeBytes: geo.sizeBytes,
        logicalBlockSize: geo.logicalBlockSize,
        physicalBlockSize: geo.physicalBlockSize,
        pipe,
        snapshotId: null,
      });
      fd = -1;
      device = undefined;
      pipe = undefined;
      log(`attached ${path} (${id.key}) as ${info.tracked}${readOnly ? ", read-only" : ""}`);
      // A queue that failed after START_DEV but before this entry existed.
      const t = this.#tracked.get(id.key)!;
      if (t.device.failure) this.#onQueueFatal(id.key, t.device.failure);
      return info;
    } catch (err) {
      if (device) {
        // Created but not registered (e.g. its node vanished): remove it again.
        const created = device;
        await created.destroy().catch((e) => log(`removing ${created.blockPath} failed: ${e}`));
      }
      pipe?.close();
      throw err;
    } finally {
      this.#attaching.delete(id.key);
      if (fd >= 0) this.#libc.close(fd);
    }
  }

  async #detach(path: string): Promise<TrackedInfo> {
    this.#refuseWhenStopping();
    const id = identifyBlockDevice(path, "detach");
    const t = this.#find(id);
    if (!t) throw new BlksnapError("ENOENT", `Cannot detach "${path}": it is not tracked`);
    if (t.detaching) {
      throw new BlksnapError("EALREADY", `Cannot detach "${path}": a detach is in progress`);
    }
    if (t.snapshotId !== null) {
      throw new BlksnapError(
        "EBUSY",
        `Cannot detach "${path}": it is in snapshot ${t.snapshotId} (blksnap snapshot_destroy --id ${t.snapshotId} first)`,
      );
    }
    // Hold the tracked device exclusively while it goes away: refuses when it is
    // mounted, and keeps anyone from mounting it during the teardown.
    const guard = openExclusive(
      this.#libc,
      blockDeviceId(t.info.tracked, t.info.trackedDevice),
      "detach",
    );
    t.detaching = true;
    // Write back what the block device's own page cache holds before the stop:
    // with user recovery the kernel fails I/O that arrives during the teardown.
    this.#libc.sym.fsync(guard);
    let guardOpen = true;
    const closeGuard = () => {
      if (guardOpen) this.#libc.close(guard);
      guardOpen = false;
    };
    try {
      await this.#remove(t, closeGuard);
    } finally {
      closeGuard();
    }
    log(`detached ${t.info.original} (was ${t.info.tracked})`);
    return t.info;
  }

  async #remove(t: Tracked, afterStop?: () => void): Promise<void> {
    if (t.snapshotId !== null) {
      // A device going away takes its snapshot with it, mounted images or not:
      // corrupted first, so no image serves what the original now holds.
      t.pipe.ctl.corrupt(-ERRNO.ENODEV);
      t.pipe.wakeAll();
      await this.snapshots.destroy(t.snapshotId, true).catch((err) =>
        log(`destroying snapshot ${t.snapshotId} of ${t.info.original} failed: ${err}`)
      );
    }
    this.#tracked.delete(t.info.originalDevice);
    // Parked writes must go before STOP_DEV can complete.
    t.pipe.ctl.openGate();
    t.pipe.stopCow();
    await t.device.destroy(afterStop);
    // Only once every queue has exited: a queue still using the number would
    // write into whatever file reuses it.
    this.#libc.close(t.originalFd);
    t.pipe.close();
  }

  #onQueueFatal(key: string, message: string): void {
    log(`FATAL: ${message}`);
    const t = this.#tracked.get(key);
    if (!t || t.detaching) return;
    t.detaching = true;
    log(`stopping ${t.info.tracked}: a queue of it failed; I/O to it now fails`);
    this.#track(this.#remove(t)).catch((err) => log(`removing ${t.info.tracked} failed: ${err}`));
  }

  #refuseWhenStopping(): void {
    if (this.#shuttingDown) throw new BlksnapError("ESRCH", "The daemon is shutting down");
  }

  /**
   * Deletes every device this daemon made. Filesystems still mounted on a
   * tracked device are synced first; they see the device go away.
   */
  async shutdown(): Promise<void> {
    if (this.#shuttingDown) return;
    this.#shuttingDown = true;
    // Let attaches and detaches under way finish; what they leave is removed below.
    await Promise.allSettled([...this.#inflight]);
    await this.snapshots.destroyAll();
    const all = [...this.#tracked.values()];
    if (all.length > 0) {
      this.#libc.sym.sync();
      for (const t of all) {
        t.detaching = true;
        try {
          await this.#remove(t);
          log(`removed ${t.info.tracked} (tracking ${t.info.original})`);
        } catch (err) {
          log(`removing ${t.info.tracked} failed: ${err}`);
        }
      }
    }
    this.#ctrl.close();
  }
}

function validateGeometry(path: string, geo: Geometry): void {
  if (geo.sizeBytes === 0) {
    throw new BlksnapError("EINVAL", `Cannot attach "${path}": the device is empty (0 bytes)`);
  }
  if (geo.logicalBlockSize < 512 || geo.logicalBlockSize > 4096) {
    throw new BlksnapError(
      "EINVAL",
      `Cannot attach "${path}": logical block size ${geo.logicalBlockSize} is outside 512..4096, which ublk supports`,
    );
  }
  if (geo.sizeBytes % geo.logicalBlockSize !== 0) {
    throw new BlksnapError(
      "EINVAL",
      `Cannot attach "${path}": size is not a multiple of its block size`,
    );
  }
}

export function log(message: string): void {
  console.error(`blksnap-daemon: ${message}`);
}
