/**
 * What the pipeline stress test's main thread and its workers share: the
 * setup message, the words of the test's own control block, and the ways
 * the negative controls break the protocol.
 *
 * @module
 */

/** Int32 words of the test's control block (beside the DeviceCtl of the device). */
export const W = {
  /** 1: every worker returns (after posting its stats). */
  STOP: 0,
  /** 1: a worker found a failure and every worker stops (strict runs only). */
  FAIL: 1,
  /** Bumped after every load and store; waiters for a chunk park on it. */
  PROGRESS: 2,
  /** Bumped after a push to a ring; the store worker parks on it. */
  DOORBELL: 3,
  /** The epoch of the snapshot the readers may read, 0 while there is none. */
  SNAP: 4,
  /** Readers inside a read (the main thread waits for 0 after clearing SNAP). */
  READERS_IN: 5,
  /** The next free chunk slot of the difference storage. */
  NEXT_SLOT: 6,
  /** Workers that have started. */
  READY: 7,
  /** Chunks the store worker has stored since the start. */
  STORED: 8,
  /** Reads that found a byte other than the snapshot's. */
  MISMATCHES: 9,
  /** Per writer: writes completed since the start. */
  OPS: 16,
  /** Per writer: chunks pushed to its ring since the start. */
  PUSHED: 32,
  WORDS: 48,
} as const;

/** The most writers (W.OPS and W.PUSHED have room for this many). */
export const MAX_WRITERS = 16;

/** How a negative control breaks the protocol ("none": it does not). */
export type Flaw = "none" | "writers-skip-cow" | "readers-skip-validation";

export interface StressSetup {
  readonly role: "writer" | "reader" | "store";
  /** Index among the workers of its role. */
  readonly index: number;
  readonly seed: number;
  readonly flaw: Flaw;
  /** Strict: the first failure stops the run; otherwise failures are counted. */
  readonly strict: boolean;
  readonly chunkCount: number;
  readonly chunkBytes: number;
  readonly words: SharedArrayBuffer;
  readonly ctl: SharedArrayBuffer;
  readonly map: SharedArrayBuffer;
  readonly pool: SharedArrayBuffer;
  /** One ring per writer, writer → store worker; records are (chunk, buffer). */
  readonly rings: readonly SharedArrayBuffer[];
  /** The tracked device. */
  readonly original: SharedArrayBuffer;
  /** The pool's buffers, chunkBytes each. */
  readonly poolData: SharedArrayBuffer;
  /** The difference storage: a slot of chunkBytes per chunk. */
  readonly storage: SharedArrayBuffer;
  /** The original as it was at the take (the readers' model). */
  readonly model: SharedArrayBuffer;
  /** Int32 per chunk: 1 when a writer wrote over it while copy-on-write was active. */
  readonly written: SharedArrayBuffer;
}

/** What a worker posts back. */
export type StressMessage =
  | { readonly type: "fail"; readonly message: string }
  | { readonly type: "done"; readonly role: string; readonly stats: Record<string, number> };

/** The text that replays a seed, in every failure message. */
export function replay(seed: number): string {
  return `seed=${seed}; replay with BLKSNAP_SEED=${seed}`;
}
