/**
 * One ublk hardware queue, served by the worker thread that calls `run()`.
 *
 * Every command of a queue must come from the thread that fetched its tags, so
 * the queue owns its io_uring and does everything synchronously on its thread:
 * FETCH every tag, then loop { submit and wait; for each completion: decode
 * the request and hand it to the target, or commit the target's result with
 * COMMIT_AND_FETCH }. Nothing on that path allocates.
 *
 * Tag life: FETCHED (a ublk command is outstanding) -> SERVING (the target has
 * it) -> FETCHED via COMMIT_AND_FETCH ... until STOP_DEV completes the
 * outstanding command with -ENODEV: ENDED. The loop returns when every tag
 * has ended and no target I/O is in flight.
 */
import { ERRNO } from "../../ffi/errno.ts";
import type { Libc } from "../../ffi/libc.ts";
import { PR_SET_IO_FLUSHER, PROT } from "../../ffi/libc.ts";
import type { LiburingSymbols } from "../../ffi/liburing.ts";
import { IORING_OP, IORING_SETUP, IOSQE, SQE } from "../../ffi/uring_abi.ts";
import {
  IO_CMD,
  IO_DESC,
  UBLK_DESC_QUEUE_STRIDE,
  UBLK_IO,
  UBLK_IO_OP,
  UBLK_IO_RES_ABORT,
} from "../../ffi/ublk_abi.ts";
import { addressOf, Ring } from "../uring/ring.ts";
import { packUserData, UD_KIND, udKind, udSub, udTag } from "../uring/user_data.ts";
import { assert, unreachable } from "../assert.ts";
import {
  type IoRequest,
  newIoRequest,
  PENDING,
  type QueueContext,
  type UblkTarget,
} from "./target.ts";

export interface QueueOptions {
  devId: number;
  qId: number;
  depth: number;
  maxIoBufBytes: number;
  /** fd of /dev/ublkcN, opened by the daemon (fds are process-wide). */
  charFd: number;
  useIoctl: boolean;
  /** Per-queue counters shared with the daemon (QUEUE_STATS layout). */
  stats: SharedArrayBuffer;
  /** The target's files (e.g. the original), registered with the ring after /dev/ublkcN. */
  targetFds: number[];
  /**
   * An eventfd that other threads write to wake this queue (-1: none). Its
   * read is kept armed in the ring; each completion calls the target's onWake.
   */
  wakeFd?: number;
  /** Register the tag buffers as fixed buffers (default true). */
  fixedBuffers?: boolean;
}

/**
 * Counters each queue publishes in its device's stats SharedArrayBuffer:
 * Float64 slots [qId * STRIDE + field]; the queue is the only writer of its slots.
 * STRIDE is 16 slots (128 bytes): no two queues share a cache line (with 12, the
 * counters of queue 0 and 1 shared one, and every request moved it between CPUs).
 */
export const QUEUE_STATS = {
  STRIDE: 16,
  REQUESTS: 0,
  READS: 1,
  WRITES: 2,
  FLUSHES: 3,
  DISCARDS: 4,
  ERRORS: 5,
  BYTES_READ: 6,
  BYTES_WRITTEN: 7,
  /** io_uring_enter calls (submit and wait): requests / enters is the batching factor. */
  ENTERS: 8,
  /** Completions handled. */
  COMPLETIONS: 9,
  /**
   * Milliseconds spent inside io_uring_enter (submitting, the kernel's work
   * for it, and waiting); only with BLKSNAP_QUEUE_TIMING=1.
   */
  ENTER_MS: 10,
  /** Milliseconds spent in JavaScript handling completions (BLKSNAP_QUEUE_TIMING=1). */
  HANDLE_MS: 11,
} as const;

const TAG_FETCHED = 1;
const TAG_SERVING = 2;
const TAG_ENDED = 3;

const PAGE = 4096;

export class UblkQueue implements QueueContext {
  readonly ring: Ring;
  readonly qId: number;
  readonly depth: number;
  readonly maxIoBufBytes: number;
  readonly fileFlags: number;
  /** Whether the tag buffers are registered with the ring (fixed buffer 0). */
  readonly fixedBuffers: boolean;

  readonly #libc: Libc;
  /** SQE fd of /dev/ublkcN and of the target's files: fixed-file indexes, or the fds. */
  readonly #charFile: number;
  readonly #targetFiles: number[];
  readonly #opts: QueueOptions;
  readonly #target: UblkTarget;
  readonly #desc: Uint32Array;
  readonly #descPtr: Deno.PointerObject;
  readonly #descBytes: number;
  readonly #bufPtr: Deno.PointerObject;
  readonly #bufBase: number;
  readonly #bufBytes: number;
  readonly #bufAb: ArrayBuffer;
  readonly bufferWords: Int32Array;
  readonly #tagState: Uint8Array;
  readonly #stats: Float64Array;
  readonly #req: IoRequest = newIoRequest();
  readonly #fetchOp: number;
  readonly #commitOp: number;
  #ended = 0;
  #targetInflight = 0;
  readonly #wakeFd: number;
  readonly #wakeBufPtr: Deno.PointerObject | null = null;
  readonly #wakeBufAddress: number = 0;
  readonly #onCqe = (userData: number, res: number): void => this.#handleCqe(userData, res);

  constructor(libc: Libc, uring: LiburingSymbols, opts: QueueOptions, target: UblkTarget) {
    this.#libc = libc;
    this.#opts = opts;
    this.#target = target;
    this.qId = opts.qId;
    this.depth = opts.depth;
    this.maxIoBufBytes = opts.maxIoBufBytes;
    assert(opts.maxIoBufBytes % PAGE === 0, "max_io_buf_bytes must be page-aligned");

    // Keep memory reclaim from recursing into this device (docs/ublk.md §3).
    libc.check(libc.sym.prctl(PR_SET_IO_FLUSHER, 1n, 0n, 0n, 0n), "prctl(PR_SET_IO_FLUSHER)");

    this.#descBytes = Math.ceil((opts.depth * IO_DESC.size) / PAGE) * PAGE;
    this.#descPtr = libc.mmapShared(
      opts.charFd,
      this.#descBytes,
      opts.qId * UBLK_DESC_QUEUE_STRIDE,
      PROT.READ,
    );
    this.#desc = new Uint32Array(
      Deno.UnsafePointerView.getArrayBuffer(this.#descPtr, this.#descBytes),
    );

    this.#bufBytes = opts.depth * opts.maxIoBufBytes;
    this.#bufPtr = libc.mmapAnonymous(this.#bufBytes);
    this.#bufBase = addressOf(this.#bufPtr);
    this.#bufAb = Deno.UnsafePointerView.getArrayBuffer(this.#bufPtr, this.#bufBytes);
    this.bufferWords = new Int32Array(this.#bufAb);
    this.#tagState = new Uint8Array(opts.depth);
    this.#stats = new Float64Array(
      opts.stats,
      opts.qId * QUEUE_STATS.STRIDE * 8,
      QUEUE_STATS.STRIDE,
    );

    // One ublk command and at most a few target SQEs per tag at any time.
    const entries = 1 << Math.ceil(Math.log2(opts.depth * 4));
    this.ring = new Ring(uring, libc, {
      entries,
      cqEntries: entries * 2,
      // DEFER_TASKRUN measured no better here, and with it a queue thread that
      // stops entering the ring wedges STOP_DEV (docs/ublk.md §3).
      flags: IORING_SETUP.COOP_TASKRUN | IORING_SETUP.SINGLE_ISSUER,
    });
    // Fixed files spare the kernel an fd lookup and refcount per SQE (a few
    // microseconds per request under emulation); plain fds where registration fails.
    let fixed = true;
    try {
      this.ring.registerFiles([opts.charFd, ...opts.targetFds]);
      this.ring.registerRingFd();
    } catch {
      fixed = false;
    }
    this.fileFlags = fixed ? IOSQE.FIXED_FILE : 0;
    // The tag buffers as fixed buffer 0: target reads and writes into them
    // (ring.prepBuf) skip pinning pages per request. This pins the whole area
    // (depth x max_io_buf_bytes) for the queue's life. Without it (refused, or
    // BLKSNAP_FIXED_BUFFERS=0) the plain opcodes are used.
    this.fixedBuffers = false;
    if (opts.fixedBuffers !== false && Deno.env.get("BLKSNAP_FIXED_BUFFERS") !== "0") {
      try {
        this.ring.registerBuffers([{ address: this.#bufBase, bytes: this.#bufBytes }]);
        this.fixedBuffers = true;
      } catch (err) {
        console.error(`blksnap: queue ${opts.qId}: no fixed buffers (${err})`);
      }
    }
    this.#charFile = fixed ? 0 : opts.charFd;
    this.#targetFiles = fixed ? opts.targetFds.map((_, i) => i + 1) : [...opts.targetFds];
    this.#wakeFd = opts.wakeFd ?? -1;
    if (this.#wakeFd >= 0) {
      this.#wakeBufPtr = libc.alignedAlloc(64, 64);
      this.#wakeBufAddress = addressOf(this.#wakeBufPtr);
    }
    this.#fetchOp = (opts.useIoctl ? UBLK_IO.FETCH_REQ.ioctl : UBLK_IO.FETCH_REQ.legacy) >>> 0;
    this.#commitOp =
      (opts.useIoctl ? UBLK_IO.COMMIT_AND_FETCH_REQ.ioctl : UBLK_IO.COMMIT_AND_FETCH_REQ.legacy) >>>
      0;
  }

  targetFile(i: number): number {
    return this.#targetFiles[i]!;
  }

  buffer(tag: number): Uint8Array {
    return new Uint8Array(this.#bufAb, tag * this.maxIoBufBytes, this.maxIoBufBytes);
  }

  bufferAddress(tag: number): number {
    return this.#bufBase + tag * this.maxIoBufBytes;
  }

  /** Queues FETCH_REQ for every tag and submits them. The device may start after this. */
  fetchAll(): void {
    for (let tag = 0; tag < this.depth; tag++) {
      this.#queueUblkCmd(this.#fetchOp, tag, 0);
      this.#tagState[tag] = TAG_FETCHED;
    }
    if (this.#wakeFd >= 0) this.#armWake();
    this.ring.submit();
  }

  /** Keeps one read of the wake eventfd in flight (plain fd: it is not registered). */
  #armWake(): void {
    this.ring.prepRw(
      IORING_OP.READ,
      this.#wakeFd,
      this.#wakeBufAddress,
      8,
      0,
      packUserData(UD_KIND.WAKE, 0),
    );
  }

  /** Commits a result for a tag that the target had left PENDING (e.g. parked, then woken). */
  complete(tag: number, result: number): void {
    if (this.#tagState[tag] !== TAG_SERVING) unreachable(`complete() of idle tag ${tag}`);
    this.#finish(tag, result);
  }

  /** Serves I/O until the device stops. */
  run(): void {
    const st = this.#stats;
    const failAfter = injectedFailureAfter();
    // performance.now() costs about 0.3 µs natively (several under emulation):
    // the split of time between the kernel and JavaScript is measured on request.
    const timing = Deno.env.get("BLKSNAP_QUEUE_TIMING") === "1";
    let handled = timing ? performance.now() : 0;
    while (this.#ended < this.depth || this.#targetInflight > 0) {
      if (failAfter > 0 && st[QUEUE_STATS.REQUESTS]! >= failAfter) {
        throw new Error(
          `injected failure after ${failAfter} requests (BLKSNAP_FAULT_QUEUE_FAIL_AFTER)`,
        );
      }
      this.ring.submitAndWait(1);
      st[QUEUE_STATS.ENTERS]!++;
      if (timing) {
        const entered = performance.now();
        st[QUEUE_STATS.ENTER_MS]! += entered - handled;
        st[QUEUE_STATS.COMPLETIONS]! += this.ring.drain(this.#onCqe);
        handled = performance.now();
        st[QUEUE_STATS.HANDLE_MS]! += handled - entered;
      } else {
        st[QUEUE_STATS.COMPLETIONS]! += this.ring.drain(this.#onCqe);
      }
    }
  }

  close(): void {
    this.#target.close?.();
    this.ring.close();
    if (this.#wakeBufPtr !== null) this.#libc.free(this.#wakeBufPtr);
    this.#libc.munmap(this.#descPtr, this.#descBytes);
    this.#libc.munmap(this.#bufPtr, this.#bufBytes);
  }

  #handleCqe(userData: number, res: number): void {
    const kind = udKind(userData);
    const tag = udTag(userData);
    if (kind === UD_KIND.UBLK_CMD) {
      // Messages with values are built only on failure: the hot path allocates nothing.
      if (tag >= this.depth || this.#tagState[tag] !== TAG_FETCHED) {
        unreachable(`ublk CQE for tag ${tag} not fetched`);
      }
      if (res < 0) {
        // -ENODEV after STOP_DEV; anything else also ends the tag (the kernel refused it).
        if (res !== UBLK_IO_RES_ABORT) {
          console.error(`blksnap: ublk queue ${this.qId} tag ${tag}: command failed with ${res}`);
        }
        this.#tagState[tag] = TAG_ENDED;
        this.#ended++;
        return;
      }
      this.#tagState[tag] = TAG_SERVING;
      this.#decode(tag);
      this.#count();
      this.#finish(tag, this.#target.start(this, this.#req));
    } else if (kind === UD_KIND.TARGET_IO) {
      if (this.#tagState[tag] !== TAG_SERVING) unreachable(`target completion for idle tag ${tag}`);
      this.#targetInflight--;
      this.#finish(tag, this.#target.onCompletion(this, tag, udSub(userData), res));
    } else if (kind === UD_KIND.WAKE) {
      if (res < 0 && res !== -ERRNO.EINTR && res !== -ERRNO.EAGAIN) {
        unreachable(`wake eventfd read failed with ${res} on queue ${this.qId}`);
      }
      // Not while the device stops: the armed read would outlive the last tag.
      if (this.#ended < this.depth) this.#armWake();
      this.#target.onWake?.(this);
    } else {
      unreachable(`completion kind ${kind} on queue ${this.qId}`);
    }
  }

  /** Target I/O accounting: targets call this for every TARGET_IO SQE they queue. */
  targetSubmitted(count = 1): void {
    this.#targetInflight += count;
  }

  get served(): number {
    return this.#stats[QUEUE_STATS.REQUESTS]!;
  }

  #count(): void {
    const st = this.#stats;
    const req = this.#req;
    st[QUEUE_STATS.REQUESTS]!++;
    switch (req.op) {
      case UBLK_IO_OP.READ:
        st[QUEUE_STATS.READS]!++;
        st[QUEUE_STATS.BYTES_READ]! += req.nrSectors * 512;
        break;
      case UBLK_IO_OP.WRITE:
        st[QUEUE_STATS.WRITES]!++;
        st[QUEUE_STATS.BYTES_WRITTEN]! += req.nrSectors * 512;
        break;
      case UBLK_IO_OP.FLUSH:
        st[QUEUE_STATS.FLUSHES]!++;
        break;
      case UBLK_IO_OP.DISCARD:
      case UBLK_IO_OP.WRITE_ZEROES:
        st[QUEUE_STATS.DISCARDS]!++;
        break;
    }
  }

  #finish(tag: number, result: number): void {
    if (result === PENDING) return;
    if (result < 0) this.#stats[QUEUE_STATS.ERRORS]!++;
    this.#queueUblkCmd(this.#commitOp, tag, result);
    this.#tagState[tag] = TAG_FETCHED;
  }

  #decode(tag: number): void {
    const d = this.#desc;
    const i = (tag * IO_DESC.size) >> 2;
    const opFlags = d[i]!;
    const req = this.#req;
    req.tag = tag;
    req.op = opFlags & 0xff;
    req.flags = opFlags & ~0xff;
    req.nrSectors = d[i + 1]!;
    const hi = d[i + 3]!;
    // Floating-point arithmetic only past 2^32 sectors (it is a helper call under TCG).
    req.startSector = hi === 0 ? d[i + 2]! : d[i + 2]! + hi * 4_294_967_296;
    req.bufAddress = this.#bufBase + tag * this.maxIoBufBytes;
  }

  #queueUblkCmd(cmdOp: number, tag: number, result: number): void {
    const ring = this.ring;
    const off = ring.sqe();
    ring.sqeU8[off + SQE.opcode] = IORING_OP.URING_CMD;
    ring.sqeU8[off + SQE.flags] = this.fileFlags;
    ring.sqeI32[(off + SQE.fd) >> 2] = this.#charFile;
    ring.sqeU32[(off + SQE.cmdOp) >> 2] = cmdOp;
    ring.sqeU32[(off + SQE.userData) >> 2] = packUserData(UD_KIND.UBLK_CMD, tag);
    const cmd = off + SQE.cmd;
    ring.sqeU32[(cmd + IO_CMD.qId) >> 2] = (this.qId & 0xffff) | (tag << 16);
    ring.sqeI32[(cmd + IO_CMD.result) >> 2] = result;
    ring.setU64(cmd + IO_CMD.addr, this.#bufBase + tag * this.maxIoBufBytes);
  }
}

/**
 * Fault injection for the VM tests: a queue worker fails after serving this
 * many requests (BLKSNAP_FAULT_QUEUE_FAIL_AFTER; 0 or unset: never).
 */
function injectedFailureAfter(): number {
  const n = Number(Deno.env.get("BLKSNAP_FAULT_QUEUE_FAIL_AFTER") ?? "0");
  return Number.isSafeInteger(n) && n > 0 ? n : 0;
}
