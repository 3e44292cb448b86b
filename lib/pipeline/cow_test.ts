import { assertEquals, assertTrue } from "../engine/_assert.ts";
import { BufferPool } from "./buffer_pool.ts";
import { CHUNK, ChunkMap, chunkStateName, makeWord } from "./chunk_map.ts";
import {
  bufferReadValid,
  COW_SAFE,
  COW_WAIT_BUFFER,
  COW_WAIT_CHUNK,
  cowChunk,
  imageSource,
  imageWriteChunk,
  IW_FAILED,
  IW_STORAGE,
  IW_WAIT,
  IW_WAIT_BUFFER,
  originalReadValid,
  SRC_BUFFER,
  SRC_FAILED,
  SRC_ORIGINAL,
  SRC_STORAGE,
} from "./cow.ts";

const ALL_STATES = [
  CHUNK.NOT_COPIED,
  CHUNK.LOADING,
  CHUNK.IN_MEMORY,
  CHUNK.STORING,
  CHUNK.STORED,
  CHUNK.FAILED,
];

/** A map and a pool of 4 where chunk 0 is in `state`, holding one buffer of the pool if its state does. */
function setUp(state: number): { map: ChunkMap; pool: BufferPool; held: number } {
  const map = ChunkMap.create(2);
  const pool = BufferPool.create(4);
  if (state === CHUNK.NOT_COPIED) return { map, pool, held: -1 };
  const held = pool.take();
  assertTrue(map.tryClaim(0, held));
  if (state === CHUNK.LOADING) return { map, pool, held };
  if (state === CHUNK.FAILED) {
    pool.release(map.failed(0, CHUNK.LOADING));
    return { map, pool, held: -1 };
  }
  map.loaded(0);
  if (state === CHUNK.IN_MEMORY) return { map, pool, held };
  map.storing(0, 5);
  if (state === CHUNK.STORING) return { map, pool, held };
  map.stored(0);
  pool.release(held);
  return { map, pool, held: -1 };
}

function exhaust(pool: BufferPool): void {
  while (pool.take() >= 0) { /* take them all */ }
}

Deno.test("cowChunk() claims a NOT_COPIED chunk with a buffer of the pool", () => {
  const { map, pool } = setUp(CHUNK.NOT_COPIED);
  const buffer = cowChunk(map, pool, 0);
  assertTrue(buffer >= 0);
  assertEquals(map.word(0), makeWord(CHUNK.LOADING, buffer));
  assertEquals(pool.inUse, 1);
});

Deno.test("cowChunk() is COW_WAIT_CHUNK while another worker loads the chunk", () => {
  const { map, pool } = setUp(CHUNK.LOADING);
  assertEquals(cowChunk(map, pool, 0), COW_WAIT_CHUNK);
  assertEquals(pool.inUse, 1, "no buffer taken");
});

Deno.test("cowChunk() is COW_SAFE from IN_MEMORY on, FAILED included", () => {
  for (const state of [CHUNK.IN_MEMORY, CHUNK.STORING, CHUNK.STORED, CHUNK.FAILED]) {
    const { map, pool } = setUp(state);
    const inUse = pool.inUse;
    assertEquals(cowChunk(map, pool, 0), COW_SAFE, chunkStateName(state));
    assertEquals(pool.inUse, inUse, "no buffer taken");
  }
});

Deno.test("cowChunk() is COW_WAIT_BUFFER for a NOT_COPIED chunk when the pool is empty", () => {
  const { map, pool } = setUp(CHUNK.NOT_COPIED);
  exhaust(pool);
  assertEquals(cowChunk(map, pool, 0), COW_WAIT_BUFFER);
  assertEquals(map.state(0), CHUNK.NOT_COPIED);
  // an empty pool does not matter once the chunk is being loaded or safe
  for (const [state, code] of [[CHUNK.LOADING, COW_WAIT_CHUNK], [CHUNK.STORED, COW_SAFE]]) {
    const other = setUp(state!);
    exhaust(other.pool);
    assertEquals(cowChunk(other.map, other.pool, 0), code, chunkStateName(state!));
  }
});

Deno.test("cowChunk() gives the buffer back when it loses the claim to another worker", () => {
  const { map, pool } = setUp(CHUNK.NOT_COPIED);
  // another worker claims the chunk between our look and our compare-and-swap
  const rival = pool.take();
  const racing = new Proxy(pool, {
    get(target, key) {
      if (key === "take") {
        return () => {
          const buffer = target.take();
          if (map.state(0) === CHUNK.NOT_COPIED) assertTrue(map.tryClaim(0, rival));
          return buffer;
        };
      }
      const value = Reflect.get(target, key, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  assertEquals(cowChunk(map, racing, 0), COW_WAIT_CHUNK);
  assertEquals(map.word(0), makeWord(CHUNK.LOADING, rival));
  assertEquals(pool.inUse, 1, "only the winner's buffer is in use");
  assertEquals(pool.releases, 1);
});

Deno.test("imageWriteChunk() gives the code of every state", () => {
  const expected = new Map<number, number>([
    [CHUNK.LOADING, IW_WAIT],
    [CHUNK.IN_MEMORY, IW_WAIT],
    [CHUNK.STORING, IW_WAIT],
    [CHUNK.STORED, IW_STORAGE],
    [CHUNK.FAILED, IW_FAILED],
  ]);
  for (const [state, code] of expected) {
    const { map, pool } = setUp(state);
    const inUse = pool.inUse;
    assertEquals(imageWriteChunk(map, pool, 0), code, chunkStateName(state));
    assertEquals(pool.inUse, inUse, "no buffer taken");
  }
  const { map, pool } = setUp(CHUNK.NOT_COPIED);
  const buffer = imageWriteChunk(map, pool, 0);
  assertTrue(buffer >= 0, "a NOT_COPIED chunk is claimed");
  assertEquals(map.word(0), makeWord(CHUNK.LOADING, buffer));
});

Deno.test("imageWriteChunk() is IW_WAIT_BUFFER for a NOT_COPIED chunk when the pool is empty", () => {
  const { map, pool } = setUp(CHUNK.NOT_COPIED);
  exhaust(pool);
  assertEquals(imageWriteChunk(map, pool, 0), IW_WAIT_BUFFER);
  assertEquals(map.state(0), CHUNK.NOT_COPIED);
});

Deno.test("imageSource() reads NOT_COPIED and LOADING from the original, then the buffer, the storage", () => {
  const sources = ALL_STATES.map((state) => imageSource(makeWord(state, 3)));
  assertEquals(sources, [
    SRC_ORIGINAL,
    SRC_ORIGINAL,
    SRC_BUFFER,
    SRC_BUFFER,
    SRC_STORAGE,
    SRC_FAILED,
  ]);
  assertEquals(imageSource(makeWord(CHUNK.IN_MEMORY, (1 << 27) - 1)), SRC_BUFFER);
});

Deno.test("originalReadValid() holds while no write can have reached the chunk", () => {
  const valid = ALL_STATES.map((state) => originalReadValid(setUp(state).map, 0));
  assertEquals(valid, [true, true, false, false, false, false]);
});

Deno.test("bufferReadValid() holds only while the state word is unchanged", () => {
  const { map, pool, held } = setUp(CHUNK.IN_MEMORY);
  const word = map.word(0);
  assertEquals(bufferReadValid(map, 0, word), true);
  map.storing(0, 1);
  assertEquals(bufferReadValid(map, 0, word), false, "IN_MEMORY → STORING");
  const storing = map.word(0);
  assertEquals(bufferReadValid(map, 0, storing), true);
  map.stored(0);
  pool.release(held);
  assertEquals(bufferReadValid(map, 0, storing), false, "the buffer may be reused now");
  // the same state with another buffer is another word
  const other = setUp(CHUNK.IN_MEMORY).map;
  assertEquals(bufferReadValid(other, 0, makeWord(CHUNK.IN_MEMORY, 3)), false);
});
