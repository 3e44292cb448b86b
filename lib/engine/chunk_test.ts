import { assertEquals, assertErrno, assertThrows, assertTrue } from "./_assert.ts";
import {
  chunkGeometry,
  ChunkState,
  ChunkTable,
  HEADER_BYTES,
  isLegalTransition,
  MAXIMUM_RECORDS,
  RECORD_BYTES,
  SEGMENT_SLOTS,
} from "./chunk.ts";
import { AssertionError } from "./errors.ts";
import { DEFAULT_PARAMS, makeParams } from "./params.ts";
import { Rng, seedFromEnv } from "./_test_util.ts";
import {
  bufferOfIndex,
  chunkNumber,
  offsetOfIndex,
  R,
  type ReaderSetup,
} from "./_chunk_view_shared.ts";

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
  assertEquals(table.byteLength, HEADER_BYTES, "nothing but the header before a claim");
  const numbers: number[] = [];
  for (let i = 0; i < 5000; i++) numbers.push(i * 7919 + (i % 3) * 2 ** 35);
  for (const [i, n] of numbers.entries()) {
    assertTrue(table.claim(n, i));
    if (i % 2 === 0) table.transition(n, ChunkState.LOADING, ChunkState.IN_MEMORY);
  }
  assertEquals(table.size, 5000);
  // segments are split at 3/4 full: at least 3/8 full on average
  assertTrue(table.capacity <= (5000 * 8) / 3 + SEGMENT_SLOTS, `${table.capacity} slots`);
  assertTrue(table.byteLength <= 2 * table.capacity * RECORD_BYTES, `${table.byteLength} bytes`);
  for (const [i, n] of numbers.entries()) {
    assertEquals(table.bufferIndex(n), i);
    assertEquals(table.state(n), i % 2 === 0 ? ChunkState.IN_MEMORY : ChunkState.LOADING);
  }
  assertEquals(table.countByState(), { LOADING: 2500, IN_MEMORY: 2500 });
  const seen = new Set<number>();
  table.forEach((n) => seen.add(n));
  assertEquals(seen.size, 5000, "forEach visits every record once");
  assertEquals(table.has(1), false);
});

Deno.test("ChunkTable.find() gives a slot for the state, buffer and offset in one lookup", () => {
  const table = new ChunkTable(100);
  assertEquals(table.find(9), -1);
  assertEquals(table.stateAt(-1), ChunkState.NOT_COPIED);
  table.claim(9, 4);
  table.transition(9, ChunkState.LOADING, ChunkState.IN_MEMORY);
  table.transition(9, ChunkState.IN_MEMORY, ChunkState.STORING, 2 ** 40 + 8);
  const slot = table.find(9);
  assertEquals(
    [table.stateAt(slot), table.bufferAt(slot), table.diffOffsetAt(slot)],
    [ChunkState.STORING, 4, 2 ** 40 + 8],
  );
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

Deno.test("ChunkTable accepts exactly its advertised maximum within a memory budget, never asserting", () => {
  // A budget that binds (as 2^32 bytes did for 2^26 records): the maximum
  // it advertises must be reachable, and the claim after it refused.
  const table = new ChunkTable({ maximumRecords: 1_000_000, maximumBytes: 2 ** 20 });
  const maximum = table.maximumRecords;
  assertTrue(maximum > 1000 && maximum < 1_000_000, `maximum ${maximum}`);
  for (let n = 0; n < maximum; n++) assertTrue(table.claim(n * 3, 0), `claim #${n} of ${maximum}`);
  assertEquals(table.size, maximum);
  assertEquals(table.claim(maximum * 3, 0), false);
  assertTrue(table.byteLength <= 2 ** 20);
  assertEquals(table.state(3), ChunkState.LOADING);
});

Deno.test("ChunkTable clamps its maximum to MAXIMUM_RECORDS and reserves room for all of them", () => {
  const table = new ChunkTable(2 ** 40);
  assertEquals(table.maximumRecords, MAXIMUM_RECORDS);
  // a segment per quarter of its slots: a hash would have to be very bad to need more
  assertTrue(
    table.shared.maxByteLength >= (MAXIMUM_RECORDS / (SEGMENT_SLOTS / 4)) * SEGMENT_SLOTS * 32,
  );
  assertEquals(table.byteLength, HEADER_BYTES, "reserved, not committed");
});

Deno.test("ChunkTable.claim() never rehashes the table: growth is one bounded split at a time", () => {
  // 2^18 records: the old table rehashed all of them in one claim (~60 ms)
  const table = new ChunkTable(2 ** 19);
  const view = new Int32Array(table.shared, 0, 8);
  let worstMoved = 0;
  for (let n = 0; n < 2 ** 18; n++) {
    const segments = table.capacity / SEGMENT_SLOTS;
    const before = table.layoutSequence;
    assertTrue(table.claim(n * 5, 0));
    if (table.layoutSequence !== before) {
      // a split adds one segment (a directory doubling none): it moved at most one segment
      worstMoved = Math.max(worstMoved, table.capacity / SEGMENT_SLOTS - segments);
    }
  }
  assertTrue(worstMoved <= 1, `a claim added ${worstMoved} segments`);
  assertTrue(view[0]! >= 8, "the directory doubled several times meanwhile");
  for (let n = 0; n < 2 ** 18; n += 101) assertEquals(table.state(n * 5), ChunkState.LOADING);
});

/**
 * The owner claims and transitions chunks (splitting segments, doubling the
 * directory) while reader Workers look them up through views; a reader must
 * find every chunk published before its lookup, in that state or a later
 * one, with that chunk's own buffer and offset. Each round fills a new
 * table: while it has few segments, a split moves most of the records the
 * readers look for. Returns the lookups made.
 */
async function ownerAndViews(seed: number): Promise<number> {
  const rounds = 20;
  const claimsPerRound = 4096;
  const readers = 2;
  const rng = new Rng(seed);
  const replay = `seed=${seed}; replay with BLKSNAP_SEED=${seed}`;
  const tables = Array.from({ length: rounds }, () => new ChunkTable(claimsPerRound));
  const words = new Int32Array(new SharedArrayBuffer((R.PUBLISHED + rounds) * 4));
  words.fill(-1, R.PUBLISHED);
  const states = new Int32Array(new SharedArrayBuffer(rounds * claimsPerRound * 4));
  const failures: string[] = [];
  let done = 0;
  const workers: Worker[] = [];
  const lookups = () => {
    let total = 0;
    for (let i = 0; i < readers; i++) total += Atomics.load(words, R.LOOKUPS + i);
    return total;
  };
  const nap = new Int32Array(new SharedArrayBuffer(4));
  /**
   * Blocks (the owner's thread is not a Promise's) until the readers made
   * `count` more lookups, in naps that leave the CPU to them on a busy machine.
   */
  const letReadersRun = (count: number) => {
    const target = lookups() + count;
    const deadline = Date.now() + 10_000;
    while (lookups() < target && Atomics.load(words, R.FAIL) === 0) {
      Atomics.wait(nap, 0, 0, 0.02);
      if (Date.now() > deadline) {
        failures.push(`${replay}: the readers stopped looking up`);
        Atomics.store(words, R.FAIL, 1);
      }
    }
  };
  try {
    for (let index = 0; index < readers; index++) {
      const worker = new Worker(new URL("./_chunk_view_worker.ts", import.meta.url).href, {
        type: "module",
      });
      worker.onmessage = (event: MessageEvent<{ type: string; message?: string }>) => {
        if (event.data.type === "fail") failures.push(event.data.message!);
        else done++;
      };
      worker.onerror = (event) => {
        event.preventDefault();
        failures.push(`${replay}: reader ${index} died: ${event.message}`);
        done++;
      };
      workers.push(worker);
      const setup: ReaderSetup = {
        index,
        seed,
        tables: tables.map((table) => table.shared),
        claimsPerRound,
        words: words.buffer as SharedArrayBuffer,
        states: states.buffer as SharedArrayBuffer,
      };
      worker.postMessage(setup);
    }
    const deadline = Date.now() + 10_000;
    while (Atomics.load(words, R.READY) < readers && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    let layoutChanges = 0;
    for (let round = 0; round < rounds && Atomics.load(words, R.FAIL) === 0; round++) {
      const table = tables[round]!;
      const base = round * claimsPerRound;
      Atomics.store(words, R.ROUND, round);
      const active: number[] = []; // indexes still holding a buffer
      for (let index = 0; index < claimsPerRound; index++) {
        assertTrue(table.claim(chunkNumber(index), bufferOfIndex(index)), `${replay}: claim`);
        Atomics.store(states, base + index, ChunkState.LOADING);
        Atomics.store(words, R.PUBLISHED + round, index);
        active.push(index);
        if (rng.chance(0.9)) {
          // one step of a chunk claimed before: on to STORED, or (1 in 20) FAILED
          const at = rng.int(active.length);
          const moved = active[at]!;
          const from = states[base + moved]! as ChunkState;
          const to = rng.chance(0.05) ? ChunkState.FAILED : (from + 1) as ChunkState;
          table.transition(chunkNumber(moved), from, to, offsetOfIndex(moved));
          Atomics.store(states, base + moved, to);
          if (to === ChunkState.STORED || to === ChunkState.FAILED) {
            active[at] = active[active.length - 1]!;
            active.pop();
          }
        }
        if (index % 8 === 0) letReadersRun(1);
      }
      layoutChanges += table.layoutSequence / 2;
      // the directory doubled several times under the readers
      assertTrue(new Int32Array(table.shared, 0, 1)[0]! >= 4, `${replay}: too few doublings`);
    }
    letReadersRun(1000);
    Atomics.store(words, R.STOP, 1);
    while (done < readers && failures.length === 0 && Date.now() < deadline + 30_000) {
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    if (failures.length > 0) throw new Error(failures.join("\n"));
    assertEquals(done, readers, `${replay}: the readers did not finish`);
    assertTrue(layoutChanges >= 20 * rounds, `${replay}: only ${layoutChanges} layout changes`);
    return lookups();
  } finally {
    Atomics.store(words, R.STOP, 1);
    for (const worker of workers) worker.terminate();
  }
}

Deno.test("ChunkTable views in other Workers find every published chunk while the owner splits segments and doubles the directory", async () => {
  const replay = Deno.env.get("BLKSNAP_SEED");
  for (const seed of replay ? [seedFromEnv()] : [1, seedFromEnv()]) {
    const lookups = await ownerAndViews(seed);
    assertTrue(lookups > 10_000, `seed=${seed}: only ${lookups} lookups`);
  }
});

Deno.test("No single ChunkTable.claim() takes long: 2^18 records claimed, none over 15 ms", () => {
  // The old table rehashed every record inside the claim that doubled it
  // (40-80 ms here at 2^18 records, 2.4 s at 4M). Timing is noisy on a shared
  // machine, so an outlier must show up in two runs to count.
  const worst = () => {
    const table = new ChunkTable(2 ** 19);
    let worstMs = 0;
    for (let n = 0; n <= 2 ** 18; n++) {
      const start = performance.now();
      table.claim(n * 3, 0);
      worstMs = Math.max(worstMs, performance.now() - start);
    }
    return worstMs;
  };
  const first = worst();
  if (first <= 15) return;
  const second = worst();
  assertTrue(
    second <= 15,
    `worst single claim ${first.toFixed(1)} ms, then ${second.toFixed(1)} ms`,
  );
});
