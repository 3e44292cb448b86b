import { assertEquals, assertErrno, assertThrows, assertTrue } from "./_assert.ts";
import {
  chunkGeometry,
  ChunkState,
  ChunkTable,
  HEADER_BYTES,
  isLegalTransition,
  RECORD_BYTES,
} from "./chunk.ts";
import { AssertionError } from "./errors.ts";
import { DEFAULT_PARAMS, makeParams } from "./params.ts";

const TiB = 2 ** 40;

Deno.test("chunkGeometry() starts at 256 KiB chunks", () => {
  assertEquals(chunkGeometry(TiB / 512, DEFAULT_PARAMS), {
    chunkShift: 18,
    chunkSectors: 512,
    chunkCount: 4194304,
  });
  // the last chunk may be partial
  assertEquals(chunkGeometry(513, DEFAULT_PARAMS).chunkCount, 2);
});

Deno.test("chunkGeometry() grows the chunk past the maximum count and for large minimal I/O", () => {
  const params = makeParams({ chunkMaximumCountShift: 4 });
  // at most 16 chunks: 4 MiB keeps 256 KiB chunks, 8 MiB needs 512 KiB ones
  assertEquals(chunkGeometry(2 ** 22 / 512, params).chunkShift, 18);
  assertEquals(chunkGeometry(2 ** 23 / 512, params), {
    chunkShift: 19,
    chunkSectors: 1024,
    chunkCount: 16,
  });
  const small = makeParams({ chunkMinimumShift: 12 });
  assertEquals(chunkGeometry(100, small, 65536).chunkShift, 16);
});

Deno.test("chunkGeometry() is EFAULT past the maximum chunk shift", async () => {
  const params = makeParams({ chunkMaximumCountShift: 4 });
  await assertErrno(() => chunkGeometry(2 ** 33 / 512, params), "EFAULT");
});

Deno.test("ChunkTable: a chunk without a record is NOT_COPIED", () => {
  const table = new ChunkTable(100);
  assertEquals(table.state(5), ChunkState.NOT_COPIED);
  assertEquals(table.has(5), false);
  assertEquals(table.bufferIndex(5), -1);
  assertEquals(table.diffOffsetSectors(5), -1);
  assertEquals(table.size, 0);
});

Deno.test("ChunkTable follows a chunk from LOADING to STORED", () => {
  const table = new ChunkTable(100);
  assertTrue(table.claim(7, 3));
  assertEquals(table.state(7), ChunkState.LOADING);
  assertEquals(table.bufferIndex(7), 3);
  const sequence = table.sequence(7);
  table.transition(7, ChunkState.LOADING, ChunkState.IN_MEMORY);
  table.transition(7, ChunkState.IN_MEMORY, ChunkState.STORING, 2 ** 33 + 5);
  assertEquals(table.diffOffsetSectors(7), 2 ** 33 + 5);
  assertEquals(table.bufferIndex(7), 3, "STORING still holds its buffer");
  table.transition(7, ChunkState.STORING, ChunkState.STORED);
  assertEquals(table.state(7), ChunkState.STORED);
  assertEquals(table.bufferIndex(7), -1);
  assertEquals(table.diffOffsetSectors(7), 2 ** 33 + 5);
  assertEquals(table.sequence(7), sequence + 3);
});

Deno.test("ChunkTable asserts every transition", () => {
  const table = new ChunkTable(100);
  table.claim(1, 0);
  assertThrows(() => table.claim(1, 1), AssertionError, "claimed twice");
  assertThrows(
    () => table.transition(1, ChunkState.IN_MEMORY, ChunkState.STORING, 0),
    AssertionError,
    "is LOADING",
  );
  assertThrows(
    () => table.transition(1, ChunkState.LOADING, ChunkState.STORED),
    AssertionError,
    "Illegal",
  );
  assertThrows(() => table.transition(2, ChunkState.LOADING, ChunkState.IN_MEMORY), AssertionError);
  table.transition(1, ChunkState.LOADING, ChunkState.FAILED);
  assertThrows(
    () => table.transition(1, ChunkState.FAILED, ChunkState.IN_MEMORY),
    AssertionError,
  );
});

Deno.test("isLegalTransition() allows only the documented moves", () => {
  const legal: string[] = [];
  for (let from = 0; from <= 5; from++) {
    for (let to = 0; to <= 5; to++) {
      if (isLegalTransition(from as ChunkState, to as ChunkState)) legal.push(`${from}>${to}`);
    }
  }
  assertEquals(legal, ["1>2", "1>5", "2>3", "2>5", "3>4", "3>5"]);
});

Deno.test("ChunkTable grows with the chunks touched, not with the device", () => {
  const table = new ChunkTable(1_000_000);
  const empty = table.byteLength;
  assertEquals(empty, HEADER_BYTES + 64 * RECORD_BYTES);
  const numbers: number[] = [];
  for (let i = 0; i < 5000; i++) numbers.push(i * 7919 + (i % 3) * 2 ** 35);
  for (const [i, n] of numbers.entries()) {
    assertTrue(table.claim(n, i));
    if (i % 2 === 0) table.transition(n, ChunkState.LOADING, ChunkState.IN_MEMORY);
  }
  assertEquals(table.size, 5000);
  assertEquals(table.capacity, 16384);
  for (const [i, n] of numbers.entries()) {
    assertEquals(table.bufferIndex(n), i);
    assertEquals(table.state(n), i % 2 === 0 ? ChunkState.IN_MEMORY : ChunkState.LOADING);
  }
  assertEquals(table.countByState(), { LOADING: 2500, IN_MEMORY: 2500 });
  assertEquals(table.has(1), false);
});

Deno.test("ChunkTable.claim() refuses past its maximum number of records", () => {
  const table = new ChunkTable(3);
  assertTrue(table.claim(0, 0));
  assertTrue(table.claim(1, 0));
  assertTrue(table.claim(2, 0));
  assertEquals(table.claim(3, 0), false);
});

Deno.test("ChunkTable.fromShared() views the owner's records and follows its growth", () => {
  const table = new ChunkTable(10_000);
  const view = ChunkTable.fromShared(table.shared);
  table.claim(3, 1);
  assertEquals(view.state(3), ChunkState.LOADING);
  for (let n = 100; n < 400; n++) table.claim(n, 0);
  assertEquals(view.capacity, table.capacity);
  assertEquals(view.size, 301);
  table.transition(3, ChunkState.LOADING, ChunkState.IN_MEMORY);
  assertEquals(view.state(3), ChunkState.IN_MEMORY);
  assertEquals(view.bufferIndex(3), 1);
  assertThrows(() => view.claim(5, 0), AssertionError, "cannot claim");
  assertThrows(
    () => view.transition(3, ChunkState.IN_MEMORY, ChunkState.FAILED),
    AssertionError,
    "cannot transition",
  );
});
