import { assertEquals, assertThrows, assertTrue } from "../engine/_assert.ts";
import { AssertionError } from "../assert.ts";
import {
  bufferOf,
  CHUNK,
  ChunkMap,
  chunkMapBytes,
  chunkStateName,
  makeWord,
  stateOf,
} from "./chunk_map.ts";

/** A map whose chunk 0 has been brought to `state` (holding buffer 9 where it holds one). */
function mapWithChunkIn(state: number): ChunkMap {
  const map = ChunkMap.create(4);
  if (state === CHUNK.NOT_COPIED) return map;
  assertTrue(map.tryClaim(0, 9));
  if (state === CHUNK.LOADING) return map;
  if (state === CHUNK.FAILED) {
    map.failed(0, CHUNK.LOADING);
    return map;
  }
  map.loaded(0);
  if (state === CHUNK.IN_MEMORY) return map;
  map.storing(0, 77);
  if (state === CHUNK.STORING) return map;
  map.stored(0);
  return map;
}

const ALL_STATES = [
  CHUNK.NOT_COPIED,
  CHUNK.LOADING,
  CHUNK.IN_MEMORY,
  CHUNK.STORING,
  CHUNK.STORED,
  CHUNK.FAILED,
];

Deno.test("ChunkMap words pack the state and the buffer in one Int32", () => {
  assertEquals(makeWord(CHUNK.LOADING, 0), 1);
  const word = makeWord(CHUNK.STORING, (1 << 27) - 1);
  assertEquals(stateOf(word), CHUNK.STORING);
  assertEquals(bufferOf(word), (1 << 27) - 1);
  assertEquals(word, word | 0, "a word is an Int32");
  assertEquals(makeWord(CHUNK.STORED), CHUNK.STORED);
  assertEquals(chunkStateName(CHUNK.IN_MEMORY), "IN_MEMORY");
  assertEquals(chunkStateName(9), "state#9");
  assertEquals(chunkMapBytes(10), 80);
});

Deno.test("ChunkMap starts with every chunk NOT_COPIED at offset 0", () => {
  const map = ChunkMap.create(5);
  for (let n = 0; n < 5; n++) {
    assertEquals(map.word(n), 0);
    assertEquals(map.state(n), CHUNK.NOT_COPIED);
    assertEquals(map.offset(n), 0);
  }
  assertEquals(map.countByState(), [5, 0, 0, 0, 0, 0]);
});

Deno.test("ChunkMap follows a chunk NOT_COPIED → LOADING → IN_MEMORY → STORING → STORED", () => {
  const map = ChunkMap.create(4);
  assertTrue(map.tryClaim(2, 5));
  assertEquals(map.word(2), makeWord(CHUNK.LOADING, 5));
  map.loaded(2);
  assertEquals(map.word(2), makeWord(CHUNK.IN_MEMORY, 5), "IN_MEMORY keeps the buffer");
  map.storing(2, 0xffff_ffff);
  assertEquals(map.word(2), makeWord(CHUNK.STORING, 5), "STORING keeps the buffer");
  assertEquals(map.offset(2), 0xffff_ffff, "the offset is a Uint32");
  map.stored(2);
  assertEquals(map.word(2), CHUNK.STORED, "STORED holds no buffer");
  assertEquals(map.offset(2), 0xffff_ffff);
  assertEquals(map.countByState(), [3, 0, 0, 0, 1, 0]);
});

Deno.test("ChunkMap.failed() takes each buffer-holding state to FAILED and gives its buffer", () => {
  for (const from of [CHUNK.LOADING, CHUNK.IN_MEMORY, CHUNK.STORING]) {
    const map = mapWithChunkIn(from);
    assertEquals(map.failed(0, from), 9, chunkStateName(from));
    assertEquals(map.word(0), CHUNK.FAILED, "FAILED holds no buffer");
  }
});

Deno.test("ChunkMap.tryClaim() loses to an earlier claim", () => {
  const map = ChunkMap.create(2);
  assertTrue(map.tryClaim(1, 3));
  assertEquals(map.tryClaim(1, 4), false);
  assertEquals(map.word(1), makeWord(CHUNK.LOADING, 3), "the loser changed nothing");
  // and to every later state
  for (const state of ALL_STATES.slice(1)) {
    const other = mapWithChunkIn(state);
    const before = other.word(0);
    assertEquals(other.tryClaim(0, 1), false, chunkStateName(state));
    assertEquals(other.word(0), before);
  }
});

Deno.test("ChunkMap.tryClaim() with buffer 0 still makes a non-zero (claimed) word", () => {
  const map = ChunkMap.create(1);
  assertTrue(map.tryClaim(0, 0));
  assertEquals(map.tryClaim(0, 0), false);
});

Deno.test("ChunkMap asserts every illegal transition and leaves the state word alone", () => {
  const moves: [string, (map: ChunkMap) => unknown, number][] = [
    ["loaded", (map) => map.loaded(0), CHUNK.LOADING],
    ["storing", (map) => map.storing(0, 1), CHUNK.IN_MEMORY],
    ["stored", (map) => map.stored(0), CHUNK.STORING],
  ];
  let illegal = 0;
  for (const state of ALL_STATES) {
    for (const [name, move, legalFrom] of moves) {
      if (state === legalFrom) continue;
      const map = mapWithChunkIn(state);
      const before = map.word(0);
      assertThrows(
        () => move(map),
        AssertionError,
        `is ${chunkStateName(state)}: illegal move`,
      );
      assertEquals(map.word(0), before, `${name} from ${chunkStateName(state)}`);
      illegal++;
    }
    for (const from of [CHUNK.LOADING, CHUNK.IN_MEMORY, CHUNK.STORING]) {
      if (state === from) continue;
      const map = mapWithChunkIn(state);
      const before = map.word(0);
      // the caller's `from` is not the chunk's state
      assertThrows(() => map.failed(0, from), AssertionError, "illegal move to FAILED");
      assertEquals(map.word(0), before);
      illegal++;
    }
  }
  assertEquals(illegal, 6 * 3 - 3 + 6 * 3 - 3);
});

Deno.test("ChunkMap.failed() asserts that only a buffer-holding state can fail", () => {
  for (const from of [CHUNK.NOT_COPIED, CHUNK.STORED, CHUNK.FAILED]) {
    const map = mapWithChunkIn(from);
    assertThrows(() => map.failed(0, from), AssertionError, "only a chunk holding a buffer");
  }
});

Deno.test("ChunkMap.storing() asserts an offset that fits 32 bits", () => {
  const map = mapWithChunkIn(CHUNK.IN_MEMORY);
  assertThrows(() => map.storing(0, -1), AssertionError, "storage offset out of range");
  assertThrows(() => map.storing(0, 2 ** 32), AssertionError, "storage offset out of range");
  assertEquals(map.state(0), CHUNK.IN_MEMORY);
});

Deno.test("ChunkMap.clear() forgets every chunk and offset", () => {
  const map = mapWithChunkIn(CHUNK.STORED);
  assertTrue(map.tryClaim(3, 1));
  map.clear();
  assertEquals(map.countByState(), [4, 0, 0, 0, 0, 0]);
  assertEquals(map.offset(0), 0);
  assertTrue(map.tryClaim(0, 2), "a cleared chunk can be claimed again");
});

Deno.test("ChunkMap views of one buffer see each other's moves (as workers would)", () => {
  const map = ChunkMap.create(8);
  const other = new ChunkMap(map.shared, 8);
  assertTrue(map.tryClaim(7, 2));
  assertEquals(other.tryClaim(7, 3), false);
  other.loaded(7);
  other.storing(7, 12);
  assertEquals(map.word(7), makeWord(CHUNK.STORING, 2));
  assertEquals(map.offset(7), 12);
  assertEquals(map.countByState(), [7, 0, 0, 1, 0, 0]);
});

Deno.test("ChunkMap asserts its chunk count and buffer size", () => {
  assertThrows(() => ChunkMap.create(0), AssertionError, "bad chunk count");
  assertThrows(() => ChunkMap.create(1.5), AssertionError, "bad chunk count");
  assertThrows(
    () => new ChunkMap(new SharedArrayBuffer(chunkMapBytes(4) - 4), 4),
    AssertionError,
    "too small",
  );
});
