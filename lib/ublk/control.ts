/**
 * The ublk control plane: commands to /dev/ublk-control over an SQE128
 * io_uring (ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV, DEL_DEV, DEL_DEV_ASYNC,
 * GET_DEV_INFO, GET_FEATURES, START_USER_RECOVERY, END_USER_RECOVERY).
 *
 * Runs on the daemon's main thread, which lives as long as the daemon: a control
 * command whose submitting thread exits can wedge that exit (docs/ublk.md
 * §1.1). The kernel punts every control command to an io-wq worker, so submit
 * returns at once; completions are polled from the event loop, which keeps the
 * socket server responsive while START_DEV waits for the queues. Commands of
 * one device run one after the other; those of different devices overlap, so
 * a device stuck in a command holds up no other. Each has its own C buffer, kept until
 * its CQE arrives (control_commands.ts), so the late answer of a command that
 * timed out lands in its own buffer, never in the next command's data.
 */
import { ERRNO, ErrnoError } from "../../ffi/errno.ts";
import type { Libc } from "../../ffi/libc.ts";
import { O } from "../../ffi/libc.ts";
import type { LiburingSymbols } from "../../ffi/liburing.ts";
import { IORING_OP, IORING_SETUP, SQE } from "../../ffi/uring_abi.ts";
import {
  CTRL_CMD,
  DEV_INFO,
  PARAMS,
  UBLK_ATTR,
  UBLK_CMD,
  UBLK_F,
  UBLK_FEATURE_NAMES,
  UBLK_PARAM_TYPE,
  type UblkCtrlCmdName,
} from "../../ffi/ublk_abi.ts";
import { addressOf, Ring } from "../uring/ring.ts";
import { ControlCommands } from "./control_commands.ts";

export const UBLK_CONTROL_PATH = "/dev/ublk-control";

export interface DevInfo {
  devId: number;
  nrHwQueues: number;
  queueDepth: number;
  state: number;
  maxIoBufBytes: number;
  ublksrvPid: number;
  flags: bigint;
  /** The server's own 64 bits, kept by the kernel (this program's owner tag). */
  ublksrvFlags: bigint;
}

export interface DeviceParams {
  devSectors: number;
  logicalBsShift: number;
  physicalBsShift: number;
  ioMinShift: number;
  ioOptShift: number;
  maxSectors: number;
  readOnly?: boolean;
  /** Advertise a volatile write cache (so FLUSH arrives) and FUA. */
  writeCache: boolean;
  discard?: {
    granularityBytes: number;
    maxDiscardSectors: number;
    maxWriteZeroesSectors: number;
  };
}

export interface AddDevOptions {
  queues: number;
  depth: number;
  maxIoBufBytes: number;
  flags: bigint;
  /** Stored by the kernel and returned by GET_DEV_INFO unchanged. */
  ublksrvFlags?: bigint;
}

const CTRL_BUF_SIZE = 4096;
const POLL_MIN_MS = 1;
const POLL_MAX_MS = 20;
/** Generous: START_DEV waits for the partition scan, which is slow under emulation. */
const DEFAULT_TIMEOUT_MS = 60_000;

export function describeFeatures(flags: bigint): string[] {
  return UBLK_FEATURE_NAMES.filter(([bit]) => (flags & bit) !== 0n).map(([, name]) => name);
}

/** One command's payload: C memory the kernel reads and writes by address. */
interface CtrlBuffer {
  ptr: Deno.PointerObject;
  address: number;
  view: DataView;
}

/** Zeroed (alignedAlloc clears it), so each command starts from a clean payload. */
function allocCtrlBuffer(libc: Libc): CtrlBuffer {
  const ptr = libc.alignedAlloc(4096, CTRL_BUF_SIZE);
  const view = new DataView(Deno.UnsafePointerView.getArrayBuffer(ptr, CTRL_BUF_SIZE));
  return { ptr, address: addressOf(ptr), view };
}

export class UblkControl {
  readonly #libc: Libc;
  readonly #ring: Ring;
  readonly #fd: number;
  /** Each command's buffer and user_data, by user_data. */
  readonly #commands: ControlCommands<CtrlBuffer>;
  /**
   * One command chain per device (ADD_DEV and GET_FEATURES, which name no
   * device, share one): a device whose command hangs holds up only itself.
   */
  readonly #tails = new Map<number, Promise<unknown>>();
  #useIoctl = true;
  #features = 0n;
  #closed = false;

  private constructor(libc: Libc, ring: Ring, fd: number) {
    this.#libc = libc;
    this.#ring = ring;
    this.#fd = fd;
    this.#commands = new ControlCommands({
      alloc: () => allocCtrlBuffer(libc),
      free: (b) => libc.free(b.ptr),
    });
  }

  /** Opens /dev/ublk-control and learns which command encoding the kernel takes. */
  static async open(libc: Libc, uring: LiburingSymbols): Promise<UblkControl> {
    let fd: number;
    try {
      fd = libc.open(UBLK_CONTROL_PATH, O.RDWR | O.CLOEXEC);
    } catch (err) {
      if (err instanceof ErrnoError && err.code === "ENOENT") {
        throw new ErrnoError(
          `open("${UBLK_CONTROL_PATH}")`,
          err.errno,
          "the ublk_drv module is not loaded (modprobe ublk_drv; Linux 6.0 or later)",
        );
      }
      throw err;
    }
    let ring: Ring;
    try {
      ring = new Ring(uring, libc, { entries: 32, flags: IORING_SETUP.SQE128 });
    } catch (err) {
      libc.close(fd);
      throw err;
    }
    const ctrl = new UblkControl(libc, ring, fd);
    try {
      ctrl.#features = await ctrl.#getFeaturesRaw();
      ctrl.#useIoctl = (ctrl.#features & UBLK_F.CMD_IOCTL_ENCODE) !== 0n;
    } catch (err) {
      // Before 6.5 there is no GET_FEATURES; those kernels take legacy numbers.
      if (!(err instanceof ErrnoError)) throw err;
      ctrl.#features = 0n;
      ctrl.#useIoctl = false;
    }
    return ctrl;
  }

  /** UBLK_F_* bits the kernel supports (0 when it cannot say). */
  get features(): bigint {
    return this.#features;
  }

  get usesIoctlEncoding(): boolean {
    return this.#useIoctl;
  }

  async addDev(options: AddDevOptions): Promise<DevInfo> {
    const { queues, depth, maxIoBufBytes, flags, ublksrvFlags = 0n } = options;
    return await this.#exec("ADD_DEV", 0xffff_ffff, ({ view: v }) => {
      v.setUint16(DEV_INFO.nrHwQueues, queues, true);
      v.setUint16(DEV_INFO.queueDepth, depth, true);
      v.setUint32(DEV_INFO.maxIoBufBytes, maxIoBufBytes, true);
      v.setUint32(DEV_INFO.devId, 0xffff_ffff, true);
      v.setBigUint64(DEV_INFO.flags, flags, true);
      v.setBigUint64(DEV_INFO.ublksrvFlags, ublksrvFlags, true);
      return { len: DEV_INFO.size, addr: true };
    }, readDevInfo);
  }

  async setParams(devId: number, p: DeviceParams): Promise<void> {
    await this.#exec("SET_PARAMS", devId, ({ view: v }) => {
      let types = UBLK_PARAM_TYPE.BASIC;
      let attrs = p.readOnly ? UBLK_ATTR.READ_ONLY : 0;
      if (p.writeCache) attrs |= UBLK_ATTR.VOLATILE_CACHE | UBLK_ATTR.FUA;
      v.setUint32(PARAMS.basic.attrs, attrs, true);
      v.setUint8(PARAMS.basic.logicalBsShift, p.logicalBsShift);
      v.setUint8(PARAMS.basic.physicalBsShift, p.physicalBsShift);
      v.setUint8(PARAMS.basic.ioOptShift, p.ioOptShift);
      v.setUint8(PARAMS.basic.ioMinShift, p.ioMinShift);
      v.setUint32(PARAMS.basic.maxSectors, p.maxSectors, true);
      v.setBigUint64(PARAMS.basic.devSectors, BigInt(p.devSectors), true);
      if (p.discard) {
        types |= UBLK_PARAM_TYPE.DISCARD;
        v.setUint32(PARAMS.discard.discardGranularity, p.discard.granularityBytes, true);
        v.setUint32(PARAMS.discard.maxDiscardSectors, p.discard.maxDiscardSectors, true);
        v.setUint32(PARAMS.discard.maxWriteZeroesSectors, p.discard.maxWriteZeroesSectors, true);
        v.setUint16(PARAMS.discard.maxDiscardSegments, 1, true);
      }
      v.setUint32(PARAMS.len, PARAMS.size, true);
      v.setUint32(PARAMS.types, types, true);
      return { len: PARAMS.size, addr: true };
    }, () => undefined);
  }

  /** Returns once the kernel has added the disk (the queues must be serving). */
  async startDev(devId: number, pid: number): Promise<void> {
    await this.#exec("START_DEV", devId, () => ({ data0: pid }), () => undefined);
  }

  async stopDev(devId: number): Promise<void> {
    await this.#exec("STOP_DEV", devId, () => ({}), () => undefined);
  }

  /** Waits until /dev/ublkcN is closed and nothing holds the disk. */
  async delDev(devId: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    await this.#exec("DEL_DEV", devId, () => ({}), () => undefined, timeoutMs);
  }

  /**
   * Returns at once; the kernel frees the device once nothing holds it (a
   * filesystem still mounted on a dead disk keeps it until unmounted).
   */
  async delDevAsync(devId: number): Promise<void> {
    await this.#exec("DEL_DEV_ASYNC", devId, () => ({}), () => undefined, 10_000, true);
  }

  /**
   * For a QUIESCED device whose server died: EBUSY while the dead server's
   * /dev/ublkcN is still open (its exit is not finished) or the device is not
   * quiesced yet; EINVAL when it was made without user recovery.
   */
  async startUserRecovery(devId: number): Promise<void> {
    await this.#exec("START_USER_RECOVERY", devId, () => ({}), () => undefined);
  }

  /** Returns once every queue of the new server has FETCHed every tag; the device is LIVE. */
  async endUserRecovery(devId: number, pid: number): Promise<void> {
    await this.#exec("END_USER_RECOVERY", devId, () => ({ data0: pid }), () => undefined);
  }

  async getDevInfo(devId: number): Promise<DevInfo> {
    return await this.#exec(
      "GET_DEV_INFO",
      devId,
      () => ({ len: DEV_INFO.size, addr: true }),
      readDevInfo,
    );
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#ring.close();
    this.#libc.close(this.#fd);
    const leaked = this.#commands.close();
    if (leaked > 0) {
      console.error(
        `blksnap: ${leaked} unanswered ublk command buffer(s) left allocated at close`,
      );
    }
  }

  async #getFeaturesRaw(): Promise<bigint> {
    return await this.#exec(
      "GET_FEATURES",
      0xffff_ffff,
      () => ({ len: 8, addr: true }),
      ({ view }) => view.getBigUint64(0, true),
      10_000,
      true,
    );
  }

  /**
   * Runs one command after the previous one finished, with a buffer of its
   * own: zeroed, filled by `fill`, read by `result` once the kernel answered.
   */
  #exec<T>(
    name: UblkCtrlCmdName,
    devId: number,
    fill: (b: CtrlBuffer) => { len?: number; addr?: boolean; data0?: number },
    result: (b: CtrlBuffer) => T,
    timeoutMs = DEFAULT_TIMEOUT_MS,
    forceIoctl = false,
  ): Promise<T> {
    const run = async () => {
      if (this.#closed) throw new Error("ublk control is closed");
      const numbers = UBLK_CMD[name];
      const op = this.#useIoctl || forceIoctl ? numbers.ioctl : numbers.legacy;
      if (op === null) {
        throw new ErrnoError(`ublk ${name}`, ERRNO.EOPNOTSUPP, "kernel too old for this command");
      }
      const { userData: ud, buffer } = this.#commands.begin();
      let inKernel = false;
      try {
        const { len = 0, addr = false, data0 = 0 } = fill(buffer);
        const ring = this.#ring;
        const off = ring.sqe();
        ring.sqeU8[off + SQE.opcode] = IORING_OP.URING_CMD;
        ring.sqeI32[(off + SQE.fd) >> 2] = this.#fd;
        ring.sqeU32[(off + SQE.cmdOp) >> 2] = op >>> 0;
        ring.sqeU32[(off + SQE.userData) >> 2] = ud;
        const cmd = off + SQE.cmd;
        ring.sqeU32[(cmd + CTRL_CMD.devId) >> 2] = devId >>> 0;
        ring.sqeU8[cmd + CTRL_CMD.queueId] = 0xff;
        ring.sqeU8[cmd + CTRL_CMD.queueId + 1] = 0xff;
        ring.sqeU8[cmd + CTRL_CMD.len] = len & 0xff;
        ring.sqeU8[cmd + CTRL_CMD.len + 1] = len >> 8;
        if (addr) ring.setU64(cmd + CTRL_CMD.addr, buffer.address);
        ring.setU64(cmd + CTRL_CMD.data0, data0);
        // From here the kernel may hold the buffer, whatever submit() says.
        inKernel = true;
        ring.submit();
        const res = await this.#awaitCompletion(ud, timeoutMs, name);
        if (res < 0) throw new ErrnoError(`ublk ${name}(dev ${devId})`, -res);
        return result(buffer);
      } finally {
        // Unanswered (timeout, failed submit): kept until its answer comes.
        if (inKernel && this.#commands.result(ud) === undefined) this.#commands.abandon(ud);
        else this.#commands.finish(ud);
      }
    };
    const chain = devId >>> 0;
    const p = (this.#tails.get(chain) ?? Promise.resolve()).then(run, run);
    const tail = p.catch(() => undefined);
    this.#tails.set(chain, tail);
    tail.then(() => {
      if (this.#tails.get(chain) === tail) this.#tails.delete(chain);
    });
    return p;
  }

  async #awaitCompletion(ud: number, timeoutMs: number, name: string): Promise<number> {
    const deadline = performance.now() + timeoutMs;
    let pollMs = POLL_MIN_MS;
    for (;;) {
      this.#ring.getEvents();
      this.#ring.drain((userData, r) => {
        const what = this.#commands.answer(userData, r);
        if (what === "late") {
          console.error(`blksnap: late answer ${r} to a timed-out ublk command dropped`);
        } else if (what === "unknown") {
          console.error(`blksnap: answer ${r} to an unknown ublk command ${userData} dropped`);
        }
      });
      const res = this.#commands.result(ud);
      if (res !== undefined) return res;
      if (performance.now() > deadline) {
        // The command stays queued in the kernel, and so does its buffer.
        throw new ErrnoError(
          `ublk ${name}`,
          ERRNO.ETIMEDOUT,
          `no answer from the kernel in ${timeoutMs} ms`,
        );
      }
      await new Promise((r) => setTimeout(r, pollMs));
      pollMs = Math.min(pollMs * 2, POLL_MAX_MS);
    }
  }
}

function readDevInfo({ view: v }: CtrlBuffer): DevInfo {
  return {
    nrHwQueues: v.getUint16(DEV_INFO.nrHwQueues, true),
    queueDepth: v.getUint16(DEV_INFO.queueDepth, true),
    state: v.getUint16(DEV_INFO.state, true),
    maxIoBufBytes: v.getUint32(DEV_INFO.maxIoBufBytes, true),
    devId: v.getUint32(DEV_INFO.devId, true),
    ublksrvPid: v.getInt32(DEV_INFO.ublksrvPid, true),
    flags: v.getBigUint64(DEV_INFO.flags, true),
    ublksrvFlags: v.getBigUint64(DEV_INFO.ublksrvFlags, true),
  };
}
