/**
 * What a ublk I/O means: the interface between a queue loop (lib/ublk/queue.ts)
 * and a target (tracked device, snapshot image).
 *
 * Every hook runs on the queue's own worker thread, inside its I/O loop; none
 * may block. A hook either returns the result to commit for the tag now, or
 * PENDING after queueing SQEs on the queue's ring (user_data kind TARGET_IO,
 * carrying the tag), whose completions come back through `onCompletion`.
 */
import type { Ring } from "../uring/ring.ts";

/** Returned by a hook that has I/O in flight for the tag. */
export const PENDING = 0x7fff_ffff;

/** The request in a tag, decoded once from the mapped descriptor (reused object). */
export interface IoRequest {
  tag: number;
  /** UBLK_IO_OP_* */
  op: number;
  /** UBLK_IO_F_* */
  flags: number;
  startSector: number;
  nrSectors: number;
  /** C address of the tag's buffer. */
  bufAddress: number;
}

/** A request object to reuse for every request (the hot path builds none). */
export function newIoRequest(): IoRequest {
  return { tag: 0, op: 0, flags: 0, startSector: 0, nrSectors: 0, bufAddress: 0 };
}

export interface QueueContext {
  readonly ring: Ring;
  readonly qId: number;
  readonly depth: number;
  readonly maxIoBufBytes: number;
  /** The tag's buffer viewed from JavaScript (for targets that touch data). */
  buffer(tag: number): Uint8Array;
  /** Targets call this for every TARGET_IO SQE they queue, so the loop knows what is in flight. */
  targetSubmitted(count?: number): void;
  /**
   * The SQE fd for the target's i-th file (QueueOptions.targetFds): a fixed-file
   * index when files are registered, else the fd itself. Set SQE flags to
   * `fileFlags` along with it.
   */
  targetFile(i: number): number;
  /** IOSQE_FIXED_FILE when files are registered, else 0. */
  readonly fileFlags: number;
  /** Commits `result` for a tag the target left PENDING with nothing in flight (a parked tag). */
  complete(tag: number, result: number): void;
  /** C address of the tag's buffer. */
  bufferAddress(tag: number): number;
  /** Every tag's buffer in one view: tag t's starts at t * maxIoBufBytes (32-bit words: a byte copy, never a float that could alter NaN bits). */
  readonly bufferWords: Int32Array;
}

export interface UblkTarget {
  /** Required. Begins serving `req`; returns the result (bytes or -errno) or PENDING. */
  start(q: QueueContext, req: IoRequest): number;
  /** Required. A TARGET_IO completion for `tag`; returns the result or PENDING. */
  onCompletion(q: QueueContext, tag: number, sub: number, res: number): number;
  /**
   * Optional. Another thread woke the queue (its eventfd): re-examine parked
   * requests, completing them with `complete()` or queueing their I/O.
   */
  onWake?(q: QueueContext): void;
  /** Optional. Called once when the queue loop ends. */
  close?(): void;
}
