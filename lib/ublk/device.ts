/**
 * A ublk device seen from the daemon's main thread: created with ADD_DEV and
 * SET_PARAMS, served by one queue worker per hardware queue, started with
 * START_DEV, and removed with STOP_DEV + DEL_DEV.
 */
import { ERRNO, ErrnoError } from "../../ffi/errno.ts";
import type { Libc } from "../../ffi/libc.ts";
import { O } from "../../ffi/libc.ts";
import { UBLK_F } from "../../ffi/ublk_abi.ts";
import type { DeviceParams, DevInfo, UblkControl } from "./control.ts";
import { QUEUE_STATS } from "./queue.ts";
import type { QueueWorkerInit, QueueWorkerReport, TargetSpec } from "./queue_worker.ts";

export interface CreateDeviceOptions {
  queues: number;
  depth: number;
  maxIoBufBytes: number;
  params: DeviceParams;
  target: TargetSpec;
  /**
   * Ask for UBLK_F_USER_RECOVERY (and its REISSUE variant) when the kernel
   * offers it: a server that dies leaves the device quiesced for the next one.
   */
  recovery: boolean;
  /** Called once if a queue worker fails; the device is already being torn down. */
  onFatal?: (message: string) => void;
  /** Stored in ublksrv_flags (lib/daemon/owner_tag.ts). */
  ownerTag?: bigint;
  /** Called right after ADD_DEV, before anything can serve I/O (e.g. to record the id). */
  onAdded?: (devId: number) => void;
}

export interface RecoverDeviceOptions {
  /** GET_DEV_INFO of the quiesced device. */
  info: DevInfo;
  target: TargetSpec;
  onFatal?: (message: string) => void;
  /** How long a dead server's exit may keep /dev/ublkcN open (START_USER_RECOVERY EBUSY). */
  busyTimeoutMs?: number;
}

export interface QueueStats {
  requests: number;
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  enters: number;
  completions: number;
  enterMs: number;
  handleMs: number;
}

const WORKER_URL = new URL("../../workers/queue_worker.ts", import.meta.url).href;
const READY_TIMEOUT_MS = 120_000;
const EXIT_TIMEOUT_MS = 60_000;

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new ErrnoError(what, ERRNO.ETIMEDOUT, `no answer in ${ms} ms`)),
      ms,
    );
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

export class UblkDevice {
  readonly info: DevInfo;
  readonly blockPath: string;
  readonly charPath: string;
  readonly queues: number;
  readonly depth: number;

  readonly #ctrl: UblkControl;
  readonly #libc: Libc;
  readonly #workers: Worker[] = [];
  readonly #stats: SharedArrayBuffer;
  readonly #exited: Array<Promise<void>> = [];
  #exitedCount = 0;
  #charFd = -1;
  #started = false;
  /** The first queue failure, whenever it came. */
  #failure: string | undefined;
  #destroying: Promise<void> | undefined;
  /** After recover(): ms spent in START_USER_RECOVERY (with its retries), starting the queues, END_USER_RECOVERY. */
  recoveryPhasesMs: { start: number; queues: number; end: number } | null = null;

  private constructor(ctrl: UblkControl, libc: Libc, info: DevInfo) {
    this.#ctrl = ctrl;
    this.#libc = libc;
    this.info = info;
    this.blockPath = `/dev/ublkb${info.devId}`;
    this.charPath = `/dev/ublkc${info.devId}`;
    this.queues = info.nrHwQueues;
    this.depth = info.queueDepth;
    this.#stats = new SharedArrayBuffer(info.nrHwQueues * QUEUE_STATS.STRIDE * 8);
  }

  /** Live per-queue counters. */
  stats(): QueueStats[] {
    const v = new Float64Array(this.#stats);
    return Array.from({ length: this.queues }, (_, q) => {
      const at = (f: number) => v[q * QUEUE_STATS.STRIDE + f]!;
      return {
        requests: at(QUEUE_STATS.REQUESTS),
        reads: at(QUEUE_STATS.READS),
        writes: at(QUEUE_STATS.WRITES),
        flushes: at(QUEUE_STATS.FLUSHES),
        discards: at(QUEUE_STATS.DISCARDS),
        errors: at(QUEUE_STATS.ERRORS),
        bytesRead: at(QUEUE_STATS.BYTES_READ),
        bytesWritten: at(QUEUE_STATS.BYTES_WRITTEN),
        enters: at(QUEUE_STATS.ENTERS),
        completions: at(QUEUE_STATS.COMPLETIONS),
        enterMs: at(QUEUE_STATS.ENTER_MS),
        handleMs: at(QUEUE_STATS.HANDLE_MS),
      };
    });
  }

  /** Set once a queue worker failed; the device must then be removed. */
  get failure(): string | undefined {
    return this.#failure;
  }

  get devId(): number {
    return this.info.devId;
  }

  get recovery(): boolean {
    return (this.info.flags & UBLK_F.USER_RECOVERY) !== 0n;
  }

  static async create(
    ctrl: UblkControl,
    libc: Libc,
    opts: CreateDeviceOptions,
  ): Promise<UblkDevice> {
    let flags = 0n;
    if (opts.recovery && (ctrl.features & UBLK_F.USER_RECOVERY)) {
      // Without REISSUE the requests the dead server held fail with EIO; with
      // it they are sent again to the next server (a write twice, never lost).
      flags |= UBLK_F.USER_RECOVERY | (ctrl.features & UBLK_F.USER_RECOVERY_REISSUE);
    }
    const info = await ctrl.addDev({
      queues: opts.queues,
      depth: opts.depth,
      maxIoBufBytes: opts.maxIoBufBytes,
      flags,
      ...(opts.ownerTag !== undefined ? { ublksrvFlags: opts.ownerTag } : {}),
    });
    const dev = new UblkDevice(ctrl, libc, info);
    try {
      opts.onAdded?.(info.devId);
      await ctrl.setParams(info.devId, opts.params);
      dev.#charFd = await openCharDevice(libc, dev.charPath);
      await dev.#startWorkers(opts);
      await ctrl.startDev(info.devId, Deno.pid);
      dev.#started = true;
      await waitForPath(dev.blockPath);
      if (dev.#failure) throw new Error(dev.#failure);
    } catch (err) {
      await dev.destroy().catch((e) => {
        console.error(`blksnap: cleaning up ublk device ${info.devId} failed: ${e}`);
      });
      throw err;
    }
    return dev;
  }

  /**
   * Takes over a QUIESCED device whose server died: START_USER_RECOVERY
   * (retried while the dead server's exit still holds /dev/ublkcN), new queue
   * workers that FETCH every tag, END_USER_RECOVERY. The requests that waited
   * are then served; nothing was failed. When it fails the device is left
   * as the kernel has it (never stopped: a filesystem may be mounted on it).
   */
  static async recover(
    ctrl: UblkControl,
    libc: Libc,
    opts: RecoverDeviceOptions,
  ): Promise<UblkDevice> {
    const dev = new UblkDevice(ctrl, libc, opts.info);
    const t0 = performance.now();
    const deadline = t0 + (opts.busyTimeoutMs ?? 30_000);
    for (;;) {
      try {
        await ctrl.startUserRecovery(dev.devId);
        break;
      } catch (err) {
        const busy = err instanceof ErrnoError && err.code === "EBUSY";
        if (!busy || performance.now() > deadline) throw err;
        await delay(20);
      }
    }
    // From here a failure leaves the device to the kernel as it is: queue
    // workers that FETCHed keep their tags, those that failed closed their
    // rings, and only this daemon's exit releases the rest.
    const t1 = performance.now();
    dev.#charFd = await openCharDevice(libc, dev.charPath);
    await dev.#startWorkers({
      target: opts.target,
      ...(opts.onFatal ? { onFatal: opts.onFatal } : {}),
    });
    const t2 = performance.now();
    await ctrl.endUserRecovery(dev.devId, Deno.pid);
    dev.#started = true;
    const t3 = performance.now();
    dev.recoveryPhasesMs = {
      start: Math.round(t1 - t0),
      queues: Math.round(t2 - t1),
      end: Math.round(t3 - t2),
    };
    await waitForPath(dev.blockPath);
    if (dev.#failure) throw new Error(dev.#failure);
    return dev;
  }

  async #startWorkers(
    opts: Pick<CreateDeviceOptions, "target" | "onFatal">,
  ): Promise<void> {
    const ready: Array<Promise<void>> = [];
    let fatalReported = false;
    for (let qId = 0; qId < this.queues; qId++) {
      const worker = new Worker(WORKER_URL, { type: "module", name: `ublk${this.devId}q${qId}` });
      this.#workers.push(worker);
      let onReady!: () => void;
      let onExit!: () => void;
      let onFail!: (e: Error) => void;
      ready.push(
        new Promise<void>((res, rej) => {
          onReady = res;
          onFail = rej;
        }),
      );
      this.#exited.push(
        new Promise<void>((res) => (onExit = res)).then(() => void this.#exitedCount++),
      );
      const fail = (message: string) => {
        this.#failure ??= message;
        onFail(new Error(message));
        onExit();
        if (!fatalReported && this.#started) {
          fatalReported = true;
          opts.onFatal?.(message);
        }
      };
      worker.onmessage = (ev: MessageEvent<QueueWorkerReport>) => {
        const r = ev.data;
        if (r.type === "ready") onReady();
        else if (r.type === "exited") onExit();
        else fail(`ublk device ${this.devId} queue ${r.qId} failed: ${r.message}`);
      };
      worker.onerror = (ev) => {
        ev.preventDefault();
        fail(`ublk device ${this.devId} queue ${qId} crashed: ${ev.message}`);
      };
      const init: QueueWorkerInit = {
        type: "init",
        devId: this.devId,
        qId,
        depth: this.depth,
        maxIoBufBytes: this.info.maxIoBufBytes,
        charFd: this.#charFd,
        useIoctl: this.#ctrl.usesIoctlEncoding,
        stats: this.#stats,
        target: opts.target,
      };
      worker.postMessage(init);
    }
    // Every worker settles (ready or failed) before a failed create sends STOP_DEV:
    // a queue that fetches after the stop would never be aborted.
    const settled = await withTimeout(
      Promise.allSettled(ready),
      READY_TIMEOUT_MS,
      `ublk device ${this.devId} queues`,
    );
    const failed = settled.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
  }

  /**
   * Stops and deletes the device. Idempotent; safe after a partial create.
   * `afterStop` runs once the disk is gone and before DEL_DEV, which waits for
   * every holder of the disk: close guard fds there.
   */
  /** True once every queue worker has exited (none can touch the target's files). */
  get queuesExited(): boolean {
    return this.#exitedCount === this.#exited.length;
  }

  destroy(afterStop?: () => void): Promise<void> {
    this.#destroying ??= this.#destroy(afterStop);
    return this.#destroying;
  }

  async #destroy(afterStop?: () => void): Promise<void> {
    const errors: unknown[] = [];
    const step = async (f: () => Promise<void> | void) => {
      try {
        await f();
      } catch (err) {
        errors.push(err);
      }
    };
    if (this.#workers.length > 0 || this.#started) {
      // STOP_DEV also answers FETCHes queued for a device that never started.
      await step(() => this.#ctrl.stopDev(this.devId));
    }
    await step(() =>
      withTimeout(Promise.all(this.#exited).then(() => {}), EXIT_TIMEOUT_MS, "queue exit")
    );
    for (const w of this.#workers) w.terminate();
    if (afterStop) await step(afterStop);
    if (this.#charFd >= 0) {
      await step(() => this.#libc.close(this.#charFd));
      this.#charFd = -1;
    }
    await step(() => this.#ctrl.delDev(this.devId));
    if (errors.length > 0) {
      throw errors[0];
    }
  }
}

/** udev (or devtmpfs) may create or hold /dev/ublkcN for a moment: retry briefly. */
async function openCharDevice(libc: Libc, path: string): Promise<number> {
  const deadline = performance.now() + 10_000;
  for (;;) {
    try {
      return libc.open(path, O.RDWR | O.CLOEXEC);
    } catch (err) {
      const retry = err instanceof ErrnoError && (err.code === "ENOENT" || err.code === "EBUSY");
      if (!retry || performance.now() > deadline) throw err;
      await delay(10);
    }
  }
}

async function waitForPath(path: string): Promise<void> {
  const deadline = performance.now() + 10_000;
  for (;;) {
    try {
      if (Deno.statSync(path).isBlockDevice) return;
    } catch {
      // not there yet
    }
    if (performance.now() > deadline) {
      throw new ErrnoError(`stat("${path}")`, ERRNO.ENOENT, "the block device node did not appear");
    }
    await delay(10);
  }
}
