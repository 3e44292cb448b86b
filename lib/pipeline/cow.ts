/**
 * The decisions of copy-on-write and of image I/O, shared by the ublk
 * targets (lib/ublk/targets/) and the native stress test's workers, so that
 * the protocol proven with real Workers is the one the devices run.
 * Everything here is synchronous and allocates nothing.
 *
 * @module
 */
import type { BufferPool } from "./buffer_pool.ts";
import { CHUNK, type ChunkMap, stateOf } from "./chunk_map.ts";

/** No copy is needed: the old content is safe (or the chunk failed and the snapshot with it). */
export const COW_SAFE = -1;
/** Another worker is loading the chunk: wait until it leaves LOADING. */
export const COW_WAIT_CHUNK = -2;
/** No buffer is free: wait until one is released. */
export const COW_WAIT_BUFFER = -3;

/**
 * One step of copy-on-write before a write over chunk `n` may reach the
 * original. Returns a buffer index (≥ 0) when this caller claimed the chunk
 * and must now read its old content into that buffer and then call
 * `map.loaded(n)` (or `map.failed`), or one of the COW_* codes.
 */
export function cowChunk(map: ChunkMap, pool: BufferPool, n: number): number {
  for (;;) {
    const state = stateOf(map.word(n));
    if (state >= CHUNK.IN_MEMORY) return COW_SAFE;
    if (state === CHUNK.LOADING) return COW_WAIT_CHUNK;
    const buffer = pool.take();
    if (buffer < 0) return COW_WAIT_BUFFER;
    if (map.tryClaim(n, buffer)) return buffer;
    pool.release(buffer); // another worker won the claim: look again
  }
}

/** Where an image read finds a chunk's snapshot content. */
export const SRC_ORIGINAL = 0;
export const SRC_BUFFER = 1;
export const SRC_STORAGE = 2;
export const SRC_FAILED = 3;

/** The source for an image read of a chunk whose state word is `word`. */
export function imageSource(word: number): number {
  switch (stateOf(word)) {
    case CHUNK.NOT_COPIED:
    case CHUNK.LOADING: // its write waits for the load: the original still holds it
      return SRC_ORIGINAL;
    case CHUNK.IN_MEMORY:
    case CHUNK.STORING:
      return SRC_BUFFER;
    case CHUNK.STORED:
      return SRC_STORAGE;
    default:
      return SRC_FAILED;
  }
}

/**
 * After reading chunk `n` from the original for the image: whether what was
 * read is the snapshot's content. A chunk still NOT_COPIED or LOADING has had
 * no write sent over it (the writer waits for IN_MEMORY), so the read saw the
 * old content; otherwise read again from the copy.
 */
export function originalReadValid(map: ChunkMap, n: number): boolean {
  return stateOf(map.word(n)) <= CHUNK.LOADING;
}

/**
 * After copying chunk `n` out of buffer for the image, with `word` the state
 * word seen before the copy: the copy is good when the word is unchanged (the
 * buffer is released only after the chunk left it for STORED or FAILED, which
 * changes the word).
 */
export function bufferReadValid(map: ChunkMap, n: number, word: number): boolean {
  return map.word(n) === word;
}

/** What an image write over chunk `n` must do. */
export const IW_STORAGE = -1;
export const IW_WAIT = -2;
export const IW_WAIT_BUFFER = -3;
export const IW_FAILED = -4;

/**
 * One step of an image write over chunk `n`: a buffer index (≥ 0) when this
 * caller claimed the chunk (load the old content into it, apply the write on
 * top, then `loaded`), IW_STORAGE when the chunk is STORED (write into the
 * storage at its offset), IW_WAIT while another worker holds it in memory,
 * IW_WAIT_BUFFER when no buffer is free, IW_FAILED when it is lost.
 */
export function imageWriteChunk(map: ChunkMap, pool: BufferPool, n: number): number {
  for (;;) {
    const state = stateOf(map.word(n));
    if (state === CHUNK.STORED) return IW_STORAGE;
    if (state === CHUNK.FAILED) return IW_FAILED;
    if (state !== CHUNK.NOT_COPIED) return IW_WAIT;
    const buffer = pool.take();
    if (buffer < 0) return IW_WAIT_BUFFER;
    if (map.tryClaim(n, buffer)) return buffer;
    pool.release(buffer);
  }
}
