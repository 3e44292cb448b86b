/**
 * The daemon's state and request handlers: the ublk control plane and the
 * tracked devices. Every state change happens here, on the main thread; the
 * socket server (server.ts) only parses and forwards.
 */
import { type Libc, O } from "../../ffi/libc.ts";
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
import {
  type ArgsOf,
  type HandoverResult,
  PROTOCOL_VERSION,
  type RecoveryReport,
  type SectorRange,
  type TrackedInfo,
} from "./protocol.ts";
import { BlksnapError, ERRNO } from "../../ffi/errno.ts";
import { DevicePipe } from "./pipe.ts";
import { CbtFile, cbtFilePath } from "./cbt_file.ts";
import { type SnapshotDevice, Snapshots } from "./snapshots.ts";
import { findMounts, thawMountPoint } from "./freeze.ts";
import { Buffer } from "node:buffer";
import { UBLK_DEV_STATE, UBLK_F } from "../../ffi/ublk_abi.ts";
import { ErrnoError } from "../../ffi/errno.ts";
import { decodeOwnerTag, encodeOwnerTag } from "./owner_tag.ts";
import {
  besideSocket,
  type DaemonState,
  type DeviceEntry,
  emptyState,
  moveAside,
  readStateFile,
  type TrackedEntry,
  writeStateFile,
} from "./state_file.ts";

export interface DaemonOptions {
  params: Params;
  queues: number;
  queueDepth: number;
  maxIoBufBytes: number;
  socketPath: string;
  /** Default: beside the socket (`control.state` for `control.sock`). */
  statePath?: string;
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

type Unrecovered = RecoveryReport["unrecovered"][number];

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
  /** ublk ids of tracked devices being removed. */
  readonly #removing = new Set<number>();
  /** The snapshot a take is under way for (recorded in the state file). */
  #taking: string | null = null;
  /** The state file (state_file.ts): rewritten at every change of the devices. */
  readonly statePath: string;
  /** Snapshots lost with a daemon that died: their corrupted event, until destroyed. */
  readonly #lost = new Map<string, { device: string; at: number; reported: boolean }>();
  /** Devices between ADD_DEV and the end of their attach, by ublk id. */
  readonly #starting = new Map<number, TrackedEntry>();
  /** Devices an earlier daemon left that this one could not take over, by ublk id. */
  readonly #unrecovered = new Map<number, { entry: TrackedEntry; report: Unrecovered }>();
  #recovery: RecoveryReport = {
    stateFile: "",
    stateFileError: null,
    previousPid: 0,
    recovered: [],
    unrecovered: [],
    removed: [],
    lostSnapshots: [],
  };

  private constructor(libc: Libc, ctrl: UblkControl, options: DaemonOptions) {
    this.#libc = libc;
    this.#ctrl = ctrl;
    this.options = options;
    this.statePath = options.statePath ?? besideSocket(options.socketPath, "state");
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

  async snapshotCreate(args: ArgsOf<"snapshot_create">) {
    try {
      return await this.snapshots.create(args);
    } finally {
      this.#saveState();
    }
  }
  async snapshotAdd(args: ArgsOf<"snapshot_add">) {
    try {
      return await this.snapshots.add(args.id, args.device);
    } finally {
      this.#saveState();
    }
  }
  async snapshotTake(id: string) {
    // Recorded before the take freezes filesystems: should this daemon die
    // while they are frozen, the next one thaws them.
    this.#taking = id;
    this.#saveState();
    try {
      return await this.snapshots.take(id);
    } finally {
      this.#taking = null;
      this.#saveState();
    }
  }
  async snapshotDestroy(id: string) {
    // A snapshot lost with a dead daemon is already gone: destroying it succeeds, as
    // destroying a corrupted snapshot does.
    if (this.#lost.delete(id)) {
      log(`snapshot_destroy of ${id}: it was lost with the daemon that held it; nothing left`);
      return { id };
    }
    try {
      return await this.snapshots.destroy(id);
    } finally {
      this.#saveState();
    }
  }
  snapshotCollect() {
    return this.snapshots.collect();
  }
  snapshotWaitEvent(id: string, timeoutMs: number): ReturnType<Snapshots["waitEvent"]> {
    const lost = this.#lost.get(id);
    if (lost && !lost.reported) {
      // Its one event: corrupted (ENODEV), as a watcher of it would have seen.
      lost.reported = true;
      return Promise.resolve({
        result: "ok",
        time: lost.at,
        event: "corrupted",
        code: 0,
        device: lost.device,
        errorCode: ERRNO.ENODEV,
      });
    }
    if (lost) {
      return Promise.reject(
        new BlksnapError("ESRCH", `Snapshot ${id} was lost when its daemon died`),
      );
    }
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
      ...this.#starting.keys(),
      ...this.#unrecovered.keys(),
      // being removed: a query would wait behind its STOP_DEV or DEL_DEV
      ...this.#removing,
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
        out.push({
          ublkId: id,
          state: stateName(info.state),
          pid: info.ublksrvPid,
          pidAlive: pidAlive(info.ublksrvPid),
        });
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
      recovery: {
        ...this.#recovery,
        unrecovered: [...this.#unrecovered.values()].map((u) => u.report),
      },
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
    let stale: number[];
    try {
      stale = await this.#refuseSecondDevice(path, id.key);
    } catch (err) {
      this.#attaching.delete(id.key);
      throw err;
    }
    let fd = -1;
    let device: UblkDevice | undefined;
    let pipe: DevicePipe | undefined;
    try {
      const original = openOriginal(this.#libc, id, "attach");
      fd = original.fd;
      const readOnly = original.readOnly;
      for (const devId of stale) {
        await this.#deleteLeftDevice(
          devId,
          "tracked",
          id.key,
          `a tracked device of ${path} left dead`,
        );
      }
      const geo = readGeometry(this.#libc, fd, id);
      validateGeometry(path, geo);
      // A new attach starts a new map (as the module does), in a file that outlives this daemon.
      const cbtFile = CbtFile.open(this.#libc, cbtFilePath(this.statePath, id.key), {
        capacitySectors: geo.sizeBytes / 512,
        params: this.options.params,
        reuse: false,
      });
      try {
        pipe = new DevicePipe(this.#libc, {
          sizeBytes: geo.sizeBytes,
          minimumIoBytes: Math.max(geo.logicalBlockSize, geo.physicalBlockSize),
          params: this.options.params,
          queues: this.options.queues,
          cbtFile,
        });
      } catch (err) {
        cbtFile.remove();
        throw err;
      }
      device = await UblkDevice.create(this.#ctrl, this.#libc, {
        queues: this.options.queues,
        depth: this.options.queueDepth,
        maxIoBufBytes: this.options.maxIoBufBytes,
        params: ublkParams(geo, this.options.maxIoBufBytes, { writeCache: true, readOnly }),
        target: { kind: "tracked", originalFd: fd, device: pipe.shared, wakeFds: pipe.wakeFds },
        recovery: true,
        onFatal: (message) => this.#onQueueFatal(id.key, message),
        ownerTag: encodeOwnerTag({ role: "tracked", originalDevice: id.key }),
        // Recorded before START_DEV: a daemon killed from here on leaves a
        // device the next one must find.
        onAdded: (devId) => {
          this.#starting.set(devId, {
            role: "tracked",
            ublkId: devId,
            original: path,
            originalDevice: id.key,
            tracked: `/dev/ublkb${devId}`,
            trackedDevice: "",
            sizeBytes: geo.sizeBytes,
            logicalBlockSize: geo.logicalBlockSize,
            physicalBlockSize: geo.physicalBlockSize,
            queues: this.options.queues,
            queueDepth: this.options.queueDepth,
            maxIoBufBytes: this.options.maxIoBufBytes,
            phase: "starting",
            cbtGenerationId: pipe!.cbt.generationId,
            attachedAt: new Date().toISOString(),
          });
          this.#saveState();
        },
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
      this.#starting.delete(info.ublkId);
      this.#saveState();
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
      for (const [devId, e] of this.#starting) {
        if (e.originalDevice === id.key) this.#starting.delete(devId);
      }
      this.#saveState();
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
    this.#removing.add(t.info.ublkId);
    // Parked writes must go before STOP_DEV can complete.
    t.pipe.ctl.openGate();
    t.pipe.stopCow();
    try {
      await t.device.destroy(afterStop);
    } catch (err) {
      // Half removed: what is left stays visible (status, the state file) for
      // `detach --force`, and the original is released if no queue can use it.
      const released = t.device.queuesExited;
      if (released) {
        this.#libc.close(t.originalFd);
        t.pipe.close();
      }
      this.#unrecovered.set(t.info.ublkId, {
        entry: entryOf(t),
        report: {
          original: t.info.original,
          originalDevice: t.info.originalDevice,
          tracked: t.info.tracked,
          ublkId: t.info.ublkId,
          reason: `removing it failed: ${err instanceof Error ? err.message : err}` +
            (released ? "" : "; its queues did not exit, so the original is still held"),
          hint: `run "blksnap detach --force --device ${t.info.tracked}"`,
        },
      });
      log(
        `removing ${t.info.tracked} failed half way (original ${released ? "released" : "held"})`,
      );
      throw err;
    } finally {
      this.#removing.delete(t.info.ublkId);
      this.#saveState();
    }
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

  /** What the state file must say now: every device this daemon serves or left unrecovered. */
  #currentState(): DaemonState {
    const state = emptyState();
    const devices: DeviceEntry[] = [];
    for (const t of this.#tracked.values()) devices.push(entryOf(t));
    for (const e of this.#starting.values()) devices.push(e);
    for (const u of this.#unrecovered.values()) devices.push(u.entry);
    const byTracked = new Map([...this.#tracked.values()].map((t) => [t.info.tracked, t]));
    const snaps = this.snapshots.status();
    for (const sn of snaps) {
      for (const d of sn.devices) {
        const m = d.image ? /^\/dev\/ublkb(\d+)$/.exec(d.image) : null;
        const t = byTracked.get(d.tracked);
        if (!m || !t) continue;
        devices.push({
          role: "image",
          ublkId: Number(m[1]),
          originalDevice: t.info.originalDevice,
          snapshotId: sn.id,
        });
      }
    }
    const seen = new Set<number>();
    state.devices = devices.filter((d) => !seen.has(d.ublkId) && seen.add(d.ublkId));
    state.snapshots = snaps.map((sn) => ({
      id: sn.id,
      devices: sn.devices.map((d) => d.original),
      storage: sn.storage.path,
      taken: sn.taken,
      ...(sn.id === this.#taking ? { taking: true } : {}),
    }));
    return state;
  }

  /**
   * Rewrites the state file. A failure is logged, never thrown: the devices
   * still work, and their owner tags keep an original from a second device.
   */
  #saveState(): void {
    try {
      writeStateFile(this.statePath, this.#currentState());
    } catch (err) {
      log(`warning: ${err instanceof Error ? err.message : err}`);
    }
  }

  /**
   * Refuses an attach of an original that already backs a ublk device this
   * daemon does not serve: one a dead daemon left (quiesced), or one another
   * daemon serves. The owner tag in each device's ublksrv_flags decides, so
   * this holds without the state file too.
   */
  async #refuseSecondDevice(path: string, key: string): Promise<number[]> {
    for (const u of this.#unrecovered.values()) {
      if (u.entry.originalDevice === key) {
        throw new BlksnapError(
          "EBUSY",
          `Cannot attach "${path}": it already backs ${u.report.tracked}, left by a daemon that died (${u.report.reason}); ${u.report.hint}`,
        );
      }
    }
    const stale: number[] = [];
    const ours = new Set([...this.#tracked.values()].map((t) => t.info.ublkId));
    for (const devId of listUblkIds()) {
      if (ours.has(devId) || this.#starting.has(devId)) continue;
      let info;
      try {
        info = await this.#ctrl.getDevInfo(devId);
      } catch {
        continue; // gone meanwhile
      }
      const tag = decodeOwnerTag(info.ublksrvFlags);
      if (!tag || tag.role !== "tracked" || tag.originalDevice !== key) continue;
      if (info.state === UBLK_DEV_STATE.DEAD && !pidAlive(info.ublksrvPid)) {
        // Never started, or stopped: no I/O waits on it. Deleted once this
        // attach holds the original (so no other daemon is making it now).
        stale.push(devId);
        continue;
      }
      const alive = info.state === UBLK_DEV_STATE.LIVE && pidAlive(info.ublksrvPid);
      throw new BlksnapError(
        "EBUSY",
        alive
          ? `Cannot attach "${path}": the device is in use: it is already tracked as /dev/ublkb${devId} by another blksnap daemon (pid ${info.ublksrvPid}); use that daemon's socket`
          : `Cannot attach "${path}": it already backs /dev/ublkb${devId} (${
            stateName(info.state)
          }), left by a blksnap daemon that died; "blksnap recover" takes it over, "blksnap detach --force --device /dev/ublkb${devId}" deletes it`,
      );
    }
    return stale;
  }

  /**
   * Takes over what the daemon before this one left, as its state file says:
   * every quiesced tracked device is recovered (its waiting I/O resumes, with
   * a new CBT map: the old one did not survive), every snapshot image is
   * deleted (snapshots are not persistent) and every snapshot is reported
   * lost. A device that cannot be recovered is left as it is and reported.
   * Runs before the socket serves, after the daemon lock is taken.
   */
  async recoverPrevious(): Promise<RecoveryReport> {
    const report = this.#recovery;
    report.stateFile = this.statePath;
    let state: DaemonState | null = null;
    try {
      state = readStateFile(this.statePath);
    } catch (err) {
      const aside = moveAside(this.statePath);
      report.stateFileError = `${err instanceof Error ? err.message : err}${
        aside ? ` (moved to ${aside})` : ""
      }`;
      log(`warning: ${report.stateFileError}; devices it named are not recovered`);
    }
    if (state) {
      report.previousPid = state.pid;
      const imagesOf = new Map<string, number[]>();
      for (const e of state.devices) {
        if (e.role !== "image") continue;
        imagesOf.set(e.snapshotId, [...(imagesOf.get(e.snapshotId) ?? []), e.ublkId]);
        await this.#removeImage(e.ublkId, e.originalDevice, e.snapshotId);
      }
      for (const sn of state.snapshots) {
        const reason =
          `the daemon that held it (pid ${state.pid}) stopped without destroying it; ` +
          `its copy-on-write state is lost, its images are removed and its difference storage released`;
        report.lostSnapshots.push({ id: sn.id, devices: sn.devices, storage: sn.storage, reason });
        const first = state.devices.find((d) =>
          d.role === "tracked" && sn.devices.includes(d.original)
        );
        this.#lost.set(sn.id, {
          device: first?.originalDevice ?? "0:0",
          at: Date.now(),
          reported: false,
        });
        log(`snapshot ${sn.id} (${sn.devices.join(", ")}) is corrupted: ${reason}`);
      }
      for (const e of state.devices) {
        if (e.role === "tracked") await this.#recoverTracked(e);
      }
      // A take cut short may have left its filesystems frozen: thaw them, now
      // that their devices serve I/O again (FITHAW of one not frozen: EINVAL).
      for (const sn of state.snapshots) {
        if (sn.taking !== true) continue;
        const keys = state.devices.flatMap((d) =>
          d.role === "tracked" && sn.devices.includes(d.original) && d.trackedDevice
            ? [d.trackedDevice]
            : []
        );
        for (const [key, mountPoint] of findMounts(keys)) {
          const thawed = thawMountPoint(this.#libc, mountPoint);
          log(
            `snapshot ${sn.id} was being taken: ${mountPoint} (${key}) ${
              thawed ? "thawed" : "was not frozen"
            }`,
          );
        }
      }
    }
    await this.#removeOrphanImages();
    this.#saveState();
    return report;
  }

  /** `blksnap recover`: tries again every device left unrecovered. */
  recover(): Promise<RecoveryReport> {
    return this.#track((async () => {
      this.#refuseWhenStopping();
      const before = this.#recovery.recovered.length;
      const left = [...this.#unrecovered.values()].map((u) => u.entry);
      left.push(...await this.#adoptable());
      for (const e of left) {
        this.#unrecovered.delete(e.ublkId);
        await this.#recoverTracked(e);
      }
      this.#saveState();
      log(
        `recover: ${this.#recovery.recovered.length - before} of ${left.length} recovered`,
      );
      return {
        ...this.#recovery,
        unrecovered: [...this.#unrecovered.values()].map((u) => u.report),
      };
    })());
  }

  /**
   * `blksnap detach --force`: a device this daemon serves is detached as
   * usual; one a dead daemon left and this one could not recover is deleted
   * (STOP_DEV fails the I/O waiting on it) unless it is mounted or open.
   */
  detachForce(path: string): Promise<{ device: string; tracked: string; ublkId: number }> {
    return this.#track((async () => {
      this.#refuseWhenStopping();
      const id = identifyBlockDevice(path, "detach");
      const t = this.#find(id);
      if (t) {
        const info = await this.#detach(path);
        return { device: info.original, tracked: info.tracked, ublkId: info.ublkId };
      }
      const u = [...this.#unrecovered.values()].find((x) =>
        x.entry.originalDevice === id.key || x.entry.tracked === path ||
        (x.entry.trackedDevice !== "" && x.entry.trackedDevice === id.key)
      );
      if (!u) throw new BlksnapError("ENOENT", `Cannot detach "${path}": it is not tracked`);
      const e = u.entry;
      // Refused while mounted or held: that would pull the disk from under it.
      let guard = -1;
      try {
        guard = this.#libc.open(e.tracked, O.RDONLY | O.EXCL | O.CLOEXEC);
      } catch (err) {
        if (err instanceof ErrnoError && err.code === "EBUSY") {
          throw new BlksnapError(
            "EBUSY",
            `Cannot detach "${path}": ${e.tracked} is mounted or open; unmount it first`,
          );
        }
        if (!(err instanceof ErrnoError && err.code === "ENOENT")) throw err;
      }
      try {
        await this.#ctrl.stopDev(e.ublkId);
      } finally {
        if (guard >= 0) this.#libc.close(guard);
      }
      await this.#ctrl.delDevAsync(e.ublkId);
      this.#unrecovered.delete(e.ublkId);
      removeFile(cbtFilePath(this.statePath, e.originalDevice));
      this.#saveState();
      log(`deleted ${e.tracked} over ${e.original} (left by a dead daemon, not recovered)`);
      return { device: e.original, tracked: e.tracked, ublkId: e.ublkId };
    })());
  }

  /**
   * Quiesced tracked devices (by their owner tag) that no state file this
   * daemon read names, e.g. when the file was lost: `recover` takes them over
   * too. Their original is known by number only; their CBT map is reset.
   */
  async #adoptable(): Promise<TrackedEntry[]> {
    const known = new Set([
      ...[...this.#tracked.values()].map((t) => t.info.ublkId),
      ...this.#unrecovered.keys(),
      ...this.#starting.keys(),
    ]);
    const out: TrackedEntry[] = [];
    for (const devId of listUblkIds()) {
      if (known.has(devId)) continue;
      let info;
      try {
        info = await this.#ctrl.getDevInfo(devId);
      } catch {
        continue;
      }
      const tag = decodeOwnerTag(info.ublksrvFlags);
      if (!tag || tag.role !== "tracked" || info.state !== UBLK_DEV_STATE.QUIESCED) continue;
      out.push({
        role: "tracked",
        ublkId: devId,
        original: `/dev/block/${tag.originalDevice}`,
        originalDevice: tag.originalDevice,
        tracked: `/dev/ublkb${devId}`,
        trackedDevice: "",
        sizeBytes: 0, // unknown: the original's own
        logicalBlockSize: 0,
        physicalBlockSize: 0,
        queues: info.nrHwQueues,
        queueDepth: info.queueDepth,
        maxIoBufBytes: info.maxIoBufBytes,
        phase: "live",
        cbtGenerationId: "",
        attachedAt: new Date().toISOString(),
      });
    }
    return out;
  }

  async #removeImage(devId: number, originalDevice: string, snapshotId: string): Promise<void> {
    let info;
    try {
      info = await this.#ctrl.getDevInfo(devId);
    } catch {
      return; // already gone
    }
    const tag = decodeOwnerTag(info.ublksrvFlags);
    if (!tag || tag.role !== "image" || tag.originalDevice !== originalDevice) return;
    if (info.state === UBLK_DEV_STATE.LIVE && pidAlive(info.ublksrvPid)) return;
    await this.#deleteLeftDevice(devId, "image", originalDevice, `image of snapshot ${snapshotId}`);
  }

  /** Images a killed daemon made after it last wrote the state file: its tag says whose. */
  async #removeOrphanImages(): Promise<void> {
    for (const devId of listUblkIds()) {
      if ([...this.#tracked.values()].some((t) => t.info.ublkId === devId)) continue;
      if (this.snapshots.ublkIds().includes(devId)) continue;
      let info;
      try {
        info = await this.#ctrl.getDevInfo(devId);
      } catch {
        continue;
      }
      const tag = decodeOwnerTag(info.ublksrvFlags);
      if (!tag || tag.role !== "image") continue;
      if (info.ublksrvPid <= 0) {
        // Never started: made by a take that died between ADD_DEV and
        // START_DEV, or being made by a live daemon. Ours when it images an
        // original this daemon tracks (held O_EXCL: no other daemon can).
        if (!this.#tracked.has(tag.originalDevice)) continue;
      } else if (pidAlive(info.ublksrvPid)) continue;
      await this.#deleteLeftDevice(devId, "image", tag.originalDevice, "image of a lost snapshot");
    }
  }

  /**
   * Deletes a device a dead daemon left. A dead disk is gone already; the
   * asynchronous delete frees the number once a filesystem still mounted on
   * it is unmounted.
   */
  async #deleteLeftDevice(
    devId: number,
    role: string,
    original: string,
    what: string,
  ): Promise<void> {
    try {
      const info = await this.#ctrl.getDevInfo(devId);
      if (info.state !== UBLK_DEV_STATE.DEAD) await this.#ctrl.stopDev(devId);
      await this.#ctrl.delDevAsync(devId);
      if (role === "tracked") removeFile(cbtFilePath(this.statePath, original));
      const reason =
        `${what}: snapshots do not survive their daemon (unmount it if it is still mounted)`;
      this.#recovery.removed.push({ ublkId: devId, role, original, reason });
      log(`removed /dev/ublkb${devId}, ${reason}`);
    } catch (err) {
      log(`removing /dev/ublkb${devId} (${what}) failed: ${err}`);
    }
  }

  async #recoverTracked(e: TrackedEntry): Promise<void> {
    const fail = (reason: string, hint: string) => {
      const report: Unrecovered = {
        original: e.original,
        originalDevice: e.originalDevice,
        tracked: e.tracked,
        ublkId: e.ublkId,
        reason,
        hint,
      };
      this.#unrecovered.set(e.ublkId, { entry: e, report });
      log(`NOT recovered: ${e.tracked} over ${e.original}: ${reason}; ${hint}`);
    };
    let info;
    try {
      info = await this.#ctrl.getDevInfo(e.ublkId);
    } catch (err) {
      if (err instanceof ErrnoError && err.code === "ENODEV") {
        log(`${e.tracked} (over ${e.original}) no longer exists: nothing to recover`);
        return;
      }
      return fail(`GET_DEV_INFO failed: ${err}`, "restart the daemon to try again");
    }
    const tag = decodeOwnerTag(info.ublksrvFlags);
    if (!tag || tag.role !== "tracked" || tag.originalDevice !== e.originalDevice) {
      log(`ublk device ${e.ublkId} is no longer the tracked device of ${e.original}: skipped`);
      return;
    }
    // The kernel quiesces the device once the dead server's exit is done.
    const deadline = performance.now() + 30_000;
    while (
      info.state === UBLK_DEV_STATE.LIVE && !pidAlive(info.ublksrvPid) &&
      performance.now() < deadline
    ) {
      await new Promise((r) => setTimeout(r, 20));
      info = await this.#ctrl.getDevInfo(e.ublkId);
    }
    if (info.state === UBLK_DEV_STATE.LIVE) {
      return fail(
        `it is served by process ${info.ublksrvPid}`,
        "stop that process first; this daemon leaves the device alone",
      );
    }
    if (info.state === UBLK_DEV_STATE.DEAD) {
      // Never started (killed during attach), or stopped by the kernel: no
      // I/O can wait on it. Delete it so the original can be attached again.
      await this.#deleteLeftDevice(
        e.ublkId,
        "tracked",
        e.originalDevice,
        `tracked device of ${e.original} that was not running`,
      );
      return;
    }
    if (info.state !== UBLK_DEV_STATE.QUIESCED) {
      return fail(`its state is ${stateName(info.state)}`, "detach it by hand");
    }
    if ((info.flags & UBLK_F.USER_RECOVERY) === 0n) {
      return fail(
        "it was made without user recovery",
        `unmount it and run "blksnap detach --force --device ${e.tracked}"`,
      );
    }
    let fd = -1;
    let pipe: DevicePipe | undefined;
    let cbtResetReason: string | null = null;
    const t0 = performance.now();
    try {
      let id: BlockDeviceId | undefined;
      try {
        id = identifyBlockDevice(e.original, "recover");
      } catch {
        id = undefined;
      }
      if (id?.key !== e.originalDevice) {
        // The path names another device now; the number may still be there.
        id = identifyBlockDevice(`/dev/block/${e.originalDevice}`, "recover");
      }
      if (id.key !== e.originalDevice) {
        throw new BlksnapError(
          "ENODEV",
          `"${e.original}" is now ${id.key}, not ${e.originalDevice}: the original is gone`,
        );
      }
      const original = openOriginal(this.#libc, id, "recover the tracked device of");
      fd = original.fd;
      const geo = readGeometry(this.#libc, fd, id);
      if (e.sizeBytes !== 0 && geo.sizeBytes !== e.sizeBytes) {
        throw new BlksnapError(
          "EINVAL",
          `"${e.original}" is now ${geo.sizeBytes} bytes, not ${e.sizeBytes}`,
        );
      }
      // The map the dead daemon kept marking, when it can be trusted; else a new one.
      const cbtFile = CbtFile.open(this.#libc, cbtFilePath(this.statePath, id.key), {
        capacitySectors: geo.sizeBytes / 512,
        params: this.options.params,
        reuse: true,
      });
      cbtResetReason = cbtFile.resetReason;
      try {
        pipe = new DevicePipe(this.#libc, {
          sizeBytes: geo.sizeBytes,
          minimumIoBytes: Math.max(geo.logicalBlockSize, geo.physicalBlockSize),
          params: this.options.params,
          queues: info.nrHwQueues,
          cbtFile,
        });
      } catch (err) {
        cbtFile.close();
        throw err;
      }
      const key = id.key;
      const device = await UblkDevice.recover(this.#ctrl, this.#libc, {
        info,
        target: { kind: "tracked", originalFd: fd, device: pipe.shared, wakeFds: pipe.wakeFds },
        onFatal: (message) => this.#onQueueFatal(key, message),
      });
      const recoveryMs = performance.now() - t0;
      const trackedRdev = Deno.statSync(device.blockPath).rdev ?? 0;
      const trackedInfo: TrackedInfo = {
        original: e.original,
        originalDevice: e.originalDevice,
        tracked: device.blockPath,
        trackedDevice: devTKey(trackedRdev),
        readOnly: original.readOnly,
        ublkId: device.devId,
        sizeBytes: geo.sizeBytes,
        logicalBlockSize: geo.logicalBlockSize,
        physicalBlockSize: geo.physicalBlockSize,
        queues: device.queues,
        queueDepth: device.depth,
        userRecovery: device.recovery,
        attachedAt: e.attachedAt,
      };
      this.#tracked.set(key, {
        info: trackedInfo,
        device,
        originalFd: fd,
        detaching: false,
        original: e.original,
        originalKey: key,
        tracked: trackedInfo.tracked,
        trackedKey: trackedInfo.trackedDevice,
        sizeBytes: geo.sizeBytes,
        logicalBlockSize: geo.logicalBlockSize,
        physicalBlockSize: geo.physicalBlockSize,
        pipe,
        snapshotId: null,
      });
      fd = -1;
      this.#recovery.recovered.push({
        original: e.original,
        tracked: trackedInfo.tracked,
        ublkId: device.devId,
        previousGenerationId: e.cbtGenerationId,
        generationId: pipe.cbt.generationId,
        cbtResetReason,
        recoveryMs: Math.round(recoveryMs),
      });
      log(
        `recovered ${trackedInfo.tracked} over ${e.original} in ${Math.round(recoveryMs)} ms ` +
          `(${JSON.stringify(device.recoveryPhasesMs)}); ` +
          (cbtResetReason === null
            ? `CBT map kept (generation ${pipe.cbt.generationId})`
            : `CBT map reset, ${cbtResetReason} (generation ${e.cbtGenerationId} -> ` +
              `${pipe.cbt.generationId}): the next backup must be a full one`),
      );
      pipe = undefined;
      if (device.failure) this.#onQueueFatal(key, device.failure);
    } catch (err) {
      // The map file stays for the next attempt (recover, or the next daemon).
      pipe?.close({ keepCbtMap: true });
      if (fd >= 0) this.#libc.close(fd);
      fail(
        err instanceof Error ? err.message : String(err),
        'I/O to it waits: fix the cause and run "blksnap recover", or unmount it and ' +
          `run "blksnap detach --force --device ${e.tracked}" (the waiting I/O then fails)`,
      );
    }
  }

  #refuseWhenStopping(): void {
    if (this.#shuttingDown) throw new BlksnapError("ESRCH", "The daemon is shutting down");
  }

  /**
   * Gets ready to exit leaving every tracked device quiesced for the next
   * daemon (which takes them over, CBT maps included): waits for attaches
   * and detaches under way, refuses every later command, and writes the
   * state file. Snapshots are not persistent: held ones make this EBUSY
   * unless `force`, and are then lost (the next daemon reports them).
   */
  async prepareHandover(force: boolean): Promise<HandoverResult> {
    this.#refuseWhenStopping();
    const held = this.snapshots.size;
    if (held > 0 && !force) {
      throw new BlksnapError(
        "EBUSY",
        `${held} snapshot(s) held: snapshots do not survive a handover. Destroy them first, ` +
          `or hand over with --force and lose them`,
      );
    }
    this.#shuttingDown = true;
    await Promise.allSettled([...this.#inflight]);
    this.#saveState();
    log(
      `handing over ${this.#tracked.size} tracked device(s) to the next daemon` +
        (held > 0 ? `; ${held} snapshot(s) lost` : ""),
    );
    return { pid: Deno.pid, devices: this.#tracked.size, snapshotsLost: held };
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

/** The state file's entry of a tracked device this daemon serves. */
function entryOf(t: Tracked): TrackedEntry {
  return {
    role: "tracked",
    ublkId: t.info.ublkId,
    original: t.info.original,
    originalDevice: t.info.originalDevice,
    tracked: t.info.tracked,
    trackedDevice: t.info.trackedDevice,
    sizeBytes: t.info.sizeBytes,
    logicalBlockSize: t.info.logicalBlockSize,
    physicalBlockSize: t.info.physicalBlockSize,
    queues: t.info.queues,
    queueDepth: t.info.queueDepth,
    maxIoBufBytes: t.device.info.maxIoBufBytes,
    phase: "live",
    cbtGenerationId: t.pipe.cbt.generationId,
    attachedAt: t.info.attachedAt,
  };
}

function stateName(state: number): string {
  return ["dead", "live", "quiesced", "fail_io"][state] ?? `state ${state}`;
}

function removeFile(path: string): void {
  try {
    Deno.removeSync(path);
  } catch {
    // not there
  }
}

/** True while a process with this pid exists. */
export function pidAlive(pid: number): boolean {
  if (pid <= 0) return false;
  try {
    return Deno.statSync(`/proc/${pid}`).isDirectory;
  } catch {
    return false;
  }
}

/** Ids of every ublk device that exists now (/sys/class/ublk-char). */
function listUblkIds(): number[] {
  const ids: number[] = [];
  try {
    for (const e of Deno.readDirSync("/sys/class/ublk-char")) {
      const m = /^ublkc(\d+)$/.exec(e.name);
      if (m) ids.push(Number(m[1]));
    }
  } catch {
    // no ublk devices (class absent)
  }
  return ids.sort((a, b) => a - b);
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
