/**
 * What the concurrent ChunkTable test (chunk_test.ts) and its reader
 * workers (_chunk_view_worker.ts) share: the control words, the records the
 * owner makes for each index, and the check of a record a reader found.
 *
 * @module
 */

import { ChunkState, chunkStateName } from "./chunk.ts";

/** Int32 words shared with the owner. */
export const R = {
  STOP: 0,
  FAIL: 1,
  /** The round, whose table the owner is filling now. */
  ROUND: 2,
  READY: 3,
  /** Per reader: lookups done. */
  LOOKUPS: 4,
  /** Per round: the highest index claimed in its table (-1 before the first). */
  PUBLISHED: 8,
} as const;

export interface ReaderSetup {
  readonly index: number;
  readonly seed: number;
  /** One table per round, each filled from empty (splits of few segments move most records). */
  readonly tables: readonly SharedArrayBuffer[];
  readonly claimsPerRound: number;
  /** R.PUBLISHED + one word per round. */
  readonly words: SharedArrayBuffer;
  /**
   * Int32 per round and index (`round * claimsPerRound + index`): the state
   * the owner has published for chunk `chunkNumber(index)` of that round.
   */
  readonly states: SharedArrayBuffer;
}

/** The chunk number of the `index`th chunk claimed (multiples of 5, some past 2^32). */
export function chunkNumber(index: number): number {
  return index * 5 + (index % 4) * 2 ** 33;
}
/** The buffer the owner claims it with. */
export function bufferOfIndex(index: number): number {
  return index % 1000;
}
/** Its offset in the difference storage once STORING. */
export function offsetOfIndex(index: number): number {
  return index * 8 + 2 ** 34;
}

function holdsBuffer(state: number): boolean {
  return state === ChunkState.LOADING || state === ChunkState.IN_MEMORY ||
    state === ChunkState.STORING;
}

/** What is wrong with the record read for `index` when `published` was published before, or "". */
export function checkRecord(
  index: number,
  published: number,
  record: { state: number; buffer: number; offset: number },
): string {
  const { state, buffer, offset } = record;
  const at = `chunk #${chunkNumber(index)} (index ${index}, published ${
    chunkStateName(published)
  }): read ${chunkStateName(state)} buffer ${buffer} offset ${offset}`;
  if (state === ChunkState.NOT_COPIED) return `${at}: missing`;
  if (!(state >= published && state <= ChunkState.FAILED)) return `${at}: older than published`;
  if (buffer !== (holdsBuffer(state) ? bufferOfIndex(index) : -1)) return `${at}: wrong buffer`;
  const stored = offsetOfIndex(index);
  const offsetOk = state === ChunkState.STORING || state === ChunkState.STORED
    ? offset === stored
    : state === ChunkState.FAILED
    ? offset === stored || offset === -1
    : offset === -1;
  return offsetOk ? "" : `${at}: wrong offset`;
}
