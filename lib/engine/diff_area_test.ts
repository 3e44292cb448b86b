import { assertEquals, assertErrno, assertRejects, assertTrue } from "./_assert.ts";
import type { IoHooks } from "./block_device.ts";
import { ChunkState } from "./chunk.ts";
import { DiffArea } from "./diff_area.ts";
import { DiffStorage } from "./diff_storage.ts";
import { AssertionError, BlksnapError } from "./errors.ts";
import { FileDevice } from "./file_device.ts";
import { makeParams, type Params } from "./params.ts";
import { filled, Gate, MemoryDiffStorageFile, Rng, tempDir, yieldTurns } from "./_test_util.ts";

const CHUNK = 4096; // chunkMinimumShift 12: 8 sectors
const CHUNK_SECTORS = 8;

interface Setup extends AsyncDisposable {
  device: FileDevice;
  file: MemoryDiffStorageFile;
  storage: DiffStorage;
  area: DiffArea;
  params: Params;
  original: Uint8Array;
  corruptions: number[];
}

async function setup(options: {
  pool?: number;
  queue?: number;
  limitSectors?: number;
  storageHooks?: IoHooks;
  params?: Partial<Params>;
  chunks?: number;
  onCorrupted?: (code: number) => void;
  /** Receives the diff area's and the storage's diagnostics. */
  logs?: string[];
  storageLog?: (message: string) => void;
  /** Don't close the area at the end (its storage hangs for ever). */
  leaveOpen?: boolean;
} = {}): Promise<Setup> {
  const dir = await tempDir();
  const params = makeParams({
    chunkMinimumShift: 12,
    diffStorageMinimumSectors: 64,
    freeDiffBufferPoolSize: options.pool ?? 8,
    chunkMaximumInQueue: options.queue ?? 8,
    ...options.params,
  });
  const chunks = options.chunks ?? 16;
  const device = await FileDevice.open({
    path: `${dir.path}/dev.img`,
    sizeBytes: chunks * CHUNK,
  });
  const original = new Rng(42).bytes(chunks * CHUNK);
  await device.write(0, original);
  const file = new MemoryDiffStorageFile({ hooks: options.storageHooks ?? {} });
  const logs = options.logs;
  const storage = await DiffStorage.open({
    path: "mem",
    limitSectors: options.limitSectors ?? 10_000,
    params,
    opener: () => Promise.resolve(file),
    log: options.storageLog ?? ((message) => logs?.push(message)),
  });
  const corruptions: number[] = [];
  const area = new DiffArea({
    device,
    storage,
    params,
    onCorrupted: options.onCorrupted ?? ((code) => corruptions.push(code)),
    log: (message) => logs?.push(message),
  });
  return {
    device,
    file,
    storage,
    area,
    params,
    original,
    corruptions,
    async [Symbol.asyncDispose]() {
      if (options.leaveOpen !== true) {
        await area.close();
        await storage.close();
      }
      device.close();
      await dir[Symbol.asyncDispose]();
    },
  };
}

/** A write to the original the way the tracker does it: copy-on-write, then write. */
async function writeOriginal(s: Setup, sector: number, data: Uint8Array): Promise<void> {
  await s.area.cow(sector, data.length / 512);
  await s.device.write(sector, data);
}

async function image(s: Setup, sector = 0, length = 16 * CHUNK): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  await s.area.readImage(sector, out);
  return out;
}

Deno.test("DiffArea.cow() saves a chunk's old content before the write reaches the original", async () => {
  await using s = await setup();
  await writeOriginal(s, CHUNK_SECTORS + 1, filled(1024, 0xee));
  assertTrue(s.area.chunks.has(1));
  assertEquals(await image(s), s.original);
  await s.area.settled();
  assertEquals(s.area.chunks.state(1), ChunkState.STORED);
  assertEquals(await image(s), s.original, "now from the difference storage");
  assertEquals(s.area.stats.chunksLoaded, 1);
  assertEquals(s.area.stats.chunksStored, 1);
  assertEquals(s.area.buffers.inUse, 0);
});

Deno.test("DiffArea.cow() copies a chunk once: a second writer waits for the first copy", async () => {
  await using s = await setup();
  const gate = new Gate();
  s.device.hooks = { before: (request) => request.kind === "read" ? gate.wait() : undefined };
  let done = 0;
  const first = s.area.cow(0, 1).then(() => done++);
  const second = s.area.cow(4, 4).then(() => done++);
  await yieldTurns(2);
  assertEquals(done, 0);
  assertEquals(s.area.chunks.state(0), ChunkState.LOADING);
  gate.open();
  await Promise.all([first, second]);
  assertEquals(s.device.stats.reads, 1);
  assertEquals(s.area.stats.chunksLoaded, 1);
});

Deno.test("DiffArea.cow() of a range copies every chunk it spans", async () => {
  await using s = await setup();
  await writeOriginal(s, CHUNK_SECTORS - 1, filled(3 * CHUNK, 1));
  assertEquals([0, 1, 2, 3, 4].map((n) => s.area.chunks.has(n)), [true, true, true, true, false]);
  assertEquals(await image(s), s.original);
});

Deno.test("An image read that raced a copy-on-write rereads from the copy", async () => {
  await using s = await setup();
  const gate = new Gate();
  let reads = 0;
  s.device.hooks = {
    before: (request) => request.kind === "read" && reads++ === 0 ? gate.wait() : undefined,
  };
  const reading = image(s, 0, CHUNK);
  await yieldTurns(1);
  // the image read is held before touching the original; a write overtakes it
  await writeOriginal(s, 0, filled(CHUNK, 0xaa));
  gate.open();
  assertEquals(await reading, s.original.subarray(0, CHUNK));
  assertEquals(s.area.stats.rereads, 1);
});

Deno.test("Writers wait for a buffer instead of growing the pool past its bound", async () => {
  const gate = new Gate();
  await using s = await setup({
    pool: 2,
    storageHooks: { before: (request) => request.kind === "write" ? gate.wait() : undefined },
  });
  let done = 0;
  const writes = [0, 1, 2, 3, 4, 5].map((n) =>
    writeOriginal(s, n * CHUNK_SECTORS, filled(512, n + 1)).then(() => done++)
  );
  await yieldTurns(3);
  assertEquals(done, 2, "two chunks are in buffers, the rest wait");
  assertEquals(s.area.buffers.made, 2);
  assertTrue(s.area.stats.backPressureWaits > 0);
  gate.open();
  await Promise.all(writes);
  await s.area.settled();
  assertEquals(s.area.stats.buffersInUsePeak, 2);
  assertEquals(await image(s), s.original);
  assertEquals(s.area.chunks.countByState(), { STORED: 6 });
});

Deno.test("Writers wait for room in the store queue, which never exceeds its bound", async () => {
  const gate = new Gate();
  await using s = await setup({
    pool: 32,
    queue: 2,
    storageHooks: { before: (request) => request.kind === "write" ? gate.wait() : undefined },
  });
  const writes = Array.from(
    { length: 12 },
    (_, n) => writeOriginal(s, n * CHUNK_SECTORS, filled(512, 9)),
  );
  await yieldTurns(3);
  // four being stored (STORE_CONCURRENCY) and two queued
  assertEquals(s.area.queueLength, 2);
  assertEquals(s.area.buffers.inUse, 6);
  gate.open();
  await Promise.all(writes);
  await s.area.settled();
  assertEquals(s.area.stats.buffersInUsePeak <= 6, true);
  assertEquals(await image(s), s.original);
});

Deno.test("An image write copies the chunk first and changes only the copy", async () => {
  await using s = await setup();
  await s.area.writeImage(CHUNK_SECTORS + 1, filled(512, 0x55));
  const expected = s.original.slice();
  expected.fill(0x55, CHUNK + 512, CHUNK + 1024);
  assertEquals(await image(s), expected);
  const onDisk = new Uint8Array(16 * CHUNK);
  s.device.readSync(0, onDisk);
  assertEquals(onDisk, s.original, "the original is untouched");
  await s.area.settled();
  assertEquals(await image(s), expected);
  // a write to the original there changes nothing in the image
  await writeOriginal(s, CHUNK_SECTORS, filled(CHUNK, 1));
  assertEquals(await image(s), expected);
});

Deno.test("An image write covering a whole chunk does not read the original", async () => {
  await using s = await setup();
  const reads = s.device.stats.reads;
  await s.area.writeImage(2 * CHUNK_SECTORS, filled(CHUNK, 7));
  assertEquals(s.device.stats.reads, reads);
  assertEquals(await image(s, 2 * CHUNK_SECTORS, CHUNK), filled(CHUNK, 7));
});

Deno.test("Image writes to a stored chunk go to the difference storage", async () => {
  await using s = await setup();
  await writeOriginal(s, 0, filled(512, 1));
  await s.area.settled();
  assertEquals(s.area.chunks.state(0), ChunkState.STORED);
  await s.area.writeImage(3, filled(1024, 0x66));
  const expected = s.original.slice(0, CHUNK);
  expected.fill(0x66, 1536, 2560);
  assertEquals(await image(s, 0, CHUNK), expected);
});

Deno.test("An image read of a chunk being stored comes from its buffer", async () => {
  const gate = new Gate();
  await using s = await setup({
    storageHooks: { before: (request) => request.kind === "write" ? gate.wait() : undefined },
  });
  await writeOriginal(s, 0, filled(CHUNK, 1));
  await yieldTurns(1);
  assertEquals(s.area.chunks.state(0), ChunkState.STORING);
  assertEquals(await image(s, 0, CHUNK), s.original.subarray(0, CHUNK));
  // an image write waits for the store to finish, then goes to the storage
  let written = false;
  const writing = s.area.writeImage(0, filled(512, 3)).then(() => written = true);
  await yieldTurns(2);
  assertEquals(written, false);
  gate.open();
  await writing;
  assertEquals((await image(s, 0, 512))[0], 3);
});

Deno.test("An EIO of the difference storage corrupts the area; writes to the original go on", async () => {
  await using s = await setup({
    storageHooks: {
      before: (request) => {
        if (request.kind === "write") throw new BlksnapError("EIO", "injected");
      },
    },
  });
  await writeOriginal(s, 0, filled(512, 1));
  await s.area.settled();
  assertEquals(s.area.errorCode, -5);
  assertEquals(s.corruptions, [-5]);
  assertEquals(s.area.chunks.state(0), ChunkState.FAILED);
  await assertErrno(() => image(s), "EIO");
  await assertErrno(() => s.area.writeImage(0, filled(512, 1)), "EIO");
  const loaded = s.area.stats.chunksLoaded;
  await writeOriginal(s, 5 * CHUNK_SECTORS, filled(512, 2));
  assertEquals(s.area.stats.chunksLoaded, loaded, "no more copy-on-write");
  assertEquals(s.area.buffers.inUse, 0);
});

Deno.test("Running out of difference storage corrupts the area with -ENOSPC", async () => {
  await using s = await setup({ limitSectors: 2 * CHUNK_SECTORS });
  for (let n = 0; n < 4; n++) {
    await writeOriginal(s, n * CHUNK_SECTORS, filled(512, 1));
    await s.area.settled();
  }
  assertEquals(s.area.errorCode, -28);
  assertEquals(s.corruptions, [-28], "one event, however many failures");
  assertEquals(s.area.chunks.countByState(), { STORED: 2, FAILED: 1 });
  assertEquals(s.area.chunks.has(3), false, "no copy-on-write once corrupted");
});

Deno.test("A failed read of the original during a copy corrupts the area, not the write", async () => {
  await using s = await setup();
  s.device.hooks = {
    before: (request) => {
      if (request.kind === "read") throw new BlksnapError("EIO", "injected");
    },
  };
  await writeOriginal(s, 0, filled(512, 1));
  assertEquals(s.area.errorCode, -5);
  assertEquals(s.area.chunks.state(0), ChunkState.FAILED);
  assertEquals(s.area.buffers.inUse, 0);
});

Deno.test("DiffArea.close() releases waiting writers and refuses image I/O with ENODEV", async () => {
  const gate = new Gate();
  await using s = await setup({
    pool: 1,
    storageHooks: { before: (request) => request.kind === "write" ? gate.wait() : undefined },
  });
  await writeOriginal(s, 0, filled(512, 1));
  let second = false;
  const waiting = writeOriginal(s, CHUNK_SECTORS, filled(512, 1)).then(() => second = true);
  await yieldTurns(2);
  assertEquals(second, false);
  const closing = s.area.close();
  await waiting;
  await assertErrno(() => image(s), "ENODEV");
  gate.open();
  await closing;
  assertEquals(s.area.buffers.inUse, 0);
});

// --- regressions ---------------------------------------------------------

Deno.test("A failed image read rejects only once every part has ended: none writes into the buffer after", async () => {
  await using s = await setup();
  await writeOriginal(s, 0, filled(512, 1));
  await s.area.settled();
  assertEquals(s.area.chunks.state(0), ChunkState.STORED);
  // chunk 0 fails at once (the storage read); chunk 1 is held reading the original
  s.file.hooks = {
    before(request) {
      if (request.kind === "read") throw new BlksnapError("EIO", "injected");
    },
  };
  const gate = new Gate();
  s.device.hooks = { before: (request) => request.kind === "read" ? gate.wait() : undefined };
  const buf = new Uint8Array(2 * CHUNK);
  let settled = false;
  const reading = s.area.readImage(0, buf).finally(() => settled = true);
  await yieldTurns(3);
  assertEquals(settled, false, "the read waits for its other part");
  gate.open();
  await assertErrno(() => reading, "EIO");
  buf.fill(0xaa); // the caller reuses its buffer for the next request
  await yieldTurns(3);
  assertTrue(buf.every((b) => b === 0xaa), "nothing wrote into the buffer afterwards");
});

Deno.test("A failed image write keeps the area busy until every part ended; close() then succeeds", async () => {
  await using s = await setup();
  await writeOriginal(s, 0, filled(512, 1));
  await s.area.settled();
  s.file.hooks = {
    before(request) {
      if (request.kind === "write") throw new BlksnapError("EIO", "injected");
    },
  };
  const gate = new Gate();
  s.device.hooks = { before: (request) => request.kind === "read" ? gate.wait() : undefined };
  // chunk 0 (STORED) fails at once; chunk 1 is claimed and held loading
  const writing = s.area.writeImage(0, filled(CHUNK + 512, 0x77));
  await yieldTurns(2);
  const closing = s.area.close();
  await yieldTurns(2);
  gate.open();
  await assertErrno(() => writing, "EIO");
  await closing; // asserted "A claim outlived the diff area" before
  assertEquals(s.area.buffers.inUse, 0);
});

Deno.test("An assertion in image I/O stays an AssertionError, not EIO", async () => {
  await using s = await setup();
  s.device.hooks = {
    before() {
      throw new AssertionError("a bug below");
    },
  };
  await assertRejects(() => image(s, 0, CHUNK), AssertionError, "a bug below");
  s.device.hooks = {};
});

Deno.test("A corruption callback that throws fails neither the copy-on-write nor the corruption", async () => {
  const logs: string[] = [];
  await using s = await setup({
    logs,
    onCorrupted() {
      throw new Deno.errors.BrokenPipe("stderr is closed");
    },
  });
  s.device.hooks = {
    before(request) {
      if (request.kind === "read") throw new BlksnapError("EIO", "bad sector");
    },
  };
  await s.area.cow(0, 1); // rejected with BrokenPipe before
  assertEquals(s.area.errorCode, -5);
  assertTrue(logs.some((line) => line.includes("stderr is closed")), logs.join("\n"));
  s.device.hooks = {};
});

Deno.test("A storage log that throws while the storer allocates crashes nothing and strands no chunk", async () => {
  // limit of one portion: at half full the storage "cannot grow" and logs, inside allocate()
  await using s = await setup({
    limitSectors: 64,
    storageLog(message) {
      throw new Deno.errors.BrokenPipe(`log: ${message}`);
    },
  });
  for (let n = 0; n < 10; n++) await s.area.cow(n * CHUNK_SECTORS, 1);
  await s.area.settled();
  assertEquals(s.area.backgroundError, null);
  assertEquals(s.area.chunks.countByState(), { STORED: 8, FAILED: 1 });
  assertEquals(s.area.errorCode, -28);
  assertEquals(s.area.buffers.inUse, 0);
});

Deno.test("Taking a chunk off the store queue wakes a writer waiting for room", async () => {
  const growth = new Gate();
  const writes = new Gate();
  let allocations = 0;
  let holdWrites = false;
  await using s = await setup({
    pool: 8,
    queue: 1,
    chunks: 32,
    storageHooks: {
      async before(request) {
        if (request.kind === "allocate" && ++allocations > 1) await growth.wait();
        if (request.kind === "write" && holdWrites) await writes.wait();
      },
    },
  });
  for (let n = 0; n < 15; n++) await s.area.cow(n * CHUNK_SECTORS, 1);
  await yieldTurns(3);
  holdWrites = true;
  await s.area.cow(15 * CHUNK_SECTORS, 1); // A: the last extent; its write is held
  for (const n of [16, 17, 18]) await s.area.cow(n * CHUNK_SECTORS, 1); // their stores wait for the growth
  await s.area.cow(19 * CHUNK_SECTORS, 1); // E: in the queue (bound 1)
  let done = false;
  const waiting = s.area.cow(20 * CHUNK_SECTORS, 1).then(() => done = true); // F: waits for room
  try {
    await yieldTurns(3);
    assertEquals(done, false);
    writes.open(); // A is stored: E leaves the queue for the storer, room for F
    await yieldTurns(10);
    assertEquals(done, true, "F was left waiting with an empty queue and free buffers");
  } finally {
    growth.open();
    writes.open();
  }
  await waiting;
});

Deno.test("Writers waiting for room are served in arrival order, one per freed room", async () => {
  const gates = [new Gate(), new Gate(), new Gate(), new Gate(), new Gate(), new Gate()];
  let stores = 0;
  await using s = await setup({
    pool: 2,
    storageHooks: {
      async before(request) {
        if (request.kind === "write") await gates[stores++]!.wait();
      },
    },
  });
  const order: number[] = [];
  const writes = [0, 1, 2, 3, 4, 5].map((n) =>
    s.area.cow(n * CHUNK_SECTORS, 1).then(() => order.push(n))
  );
  await yieldTurns(3);
  assertEquals(order, [0, 1]);
  assertEquals(s.area.roomWaiters, 4);
  for (let i = 0; i < 4; i++) {
    gates[i]!.open(); // one store ends: exactly one buffer frees
    await yieldTurns(3);
    assertEquals(order, [0, 1, 2, 3, 4, 5].slice(0, i + 3));
    assertEquals(s.area.roomWaiters, 3 - i);
  }
  for (const gate of gates) gate.open();
  await Promise.all(writes);
});

Deno.test("The stall watchdog: a hung difference storage corrupts the snapshot (-EIO), writes go on", async () => {
  const logs: string[] = [];
  const hang = new Promise<void>(() => {}); // the storage never answers
  await using s = await setup({
    pool: 4,
    queue: 3,
    params: { cowStallTimeoutMs: 50 },
    logs,
    leaveOpen: true,
    storageHooks: { before: (request) => request.kind === "write" ? hang : undefined },
  });
  const start = performance.now();
  const written = s.original.slice();
  await Promise.all([0, 1, 2, 3, 4, 5, 6, 7, 8, 9].map(async (n) => {
    const data = filled(512, n + 1);
    await writeOriginal(s, n * CHUNK_SECTORS, data);
    written.set(data, n * CHUNK);
  }));
  const elapsedMs = performance.now() - start;
  assertTrue(elapsedMs < 50 + 1000, `the writes took ${elapsedMs.toFixed(0)} ms`);
  assertEquals(s.area.errorCode, -5);
  assertEquals(s.corruptions, [-5]);
  assertTrue(logs.some((line) => line.includes("stalled")), logs.join("\n"));
  const onDisk = new Uint8Array(16 * CHUNK);
  s.device.readSync(0, onDisk);
  assertEquals(onDisk, written, "the original holds exactly what was written");
  await assertErrno(() => image(s), "EIO");
  assertEquals(s.area.roomWaiters, 0);
});

Deno.test("The stall watchdog: a growth that never ends corrupts the snapshot with -ENOSPC", async () => {
  const hang = new Promise<void>(() => {});
  let allocations = 0;
  await using s = await setup({
    pool: 4,
    queue: 3,
    chunks: 32,
    params: { cowStallTimeoutMs: 50 },
    leaveOpen: true,
    storageHooks: {
      before: (request) => request.kind === "allocate" && ++allocations > 1 ? hang : undefined,
    },
  });
  // 16 extents fit before the growth; 4 stores then wait for it and hold the
  // 4 buffers, so the writes after them wait for room
  const start = performance.now();
  for (let n = 0; n < 24; n++) await writeOriginal(s, n * CHUNK_SECTORS, filled(512, 9));
  assertTrue(performance.now() - start < 50 + 1000);
  assertEquals(s.area.errorCode, -28);
  await yieldTurns(1);
  assertEquals(s.storage.isOverflowed, true);
});

Deno.test("Slow stores that keep progressing never trip the stall watchdog", async () => {
  await using s = await setup({
    pool: 2,
    queue: 1,
    params: { cowStallTimeoutMs: 40 },
    storageHooks: {
      before: (request) =>
        request.kind === "write" ? new Promise((resolve) => setTimeout(resolve, 15)) : undefined,
    },
  });
  // 16 stores of 15 ms one after another: writers wait far longer than 40 ms in all
  await Promise.all(
    Array.from({ length: 16 }, (_, n) => writeOriginal(s, n * CHUNK_SECTORS, filled(512, 1))),
  );
  await s.area.settled();
  assertEquals(s.area.errorCode, 0);
  assertEquals(await image(s), s.original);
});

Deno.test("The chunk is never smaller than the device's minimum I/O size (bdev_io_min)", async () => {
  await using dir = await tempDir();
  using device = await FileDevice.open({
    path: `${dir.path}/dev.img`,
    sizeBytes: 1 << 20,
    minIoBytes: 65536,
  });
  const params = makeParams({ chunkMinimumShift: 12, diffStorageMinimumSectors: 1024 });
  const storage = await DiffStorage.open({
    path: "mem",
    limitSectors: 4096,
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile()),
  });
  const area = new DiffArea({ device, storage, params });
  assertEquals(area.geometry.chunkShift, 16);
  await area.close();
  await storage.close();
});

Deno.test("An unexpected error in the storer corrupts the snapshot instead of crashing the process", async () => {
  const logs: string[] = [];
  await using s = await setup({
    logs,
    leaveOpen: true, // the chunk the bug left STORING keeps its buffer: close() would assert
    storageHooks: {
      before(request) {
        if (request.kind === "write") throw new AssertionError("a bug in the storage layer");
      },
    },
  });
  await writeOriginal(s, 0, filled(512, 1));
  await yieldTurns(2); // an unhandled rejection would fail the test here
  assertEquals(s.area.errorCode, -5);
  assertTrue(s.area.backgroundError instanceof AssertionError);
  assertTrue(logs.some((line) => line.includes("a bug in the storage layer")), logs.join("\n"));
  await writeOriginal(s, CHUNK_SECTORS, filled(512, 2)); // writes go on
});

Deno.test("An image read of a chunk dropped by close() fails with ENODEV, not EIO", async () => {
  await using s = await setup();
  const gate = new Gate();
  s.device.hooks = { before: (request) => request.kind === "read" ? gate.wait() : undefined };
  const copying = s.area.cow(0, 1); // chunk 0 LOADING, held
  await yieldTurns(1);
  const reading = s.area.readImage(0, new Uint8Array(512)); // waits for the load
  await yieldTurns(1);
  const closing = s.area.close(); // the loaded chunk will be dropped (FAILED)
  gate.open();
  await copying;
  await assertErrno(() => reading, "ENODEV");
  await closing;
  assertEquals(s.area.errorCode, 0);
});
