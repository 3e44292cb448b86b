import { assertEquals, assertErrno, assertTrue } from "./_assert.ts";
import type { IoHooks } from "./block_device.ts";
import { ChunkState } from "./chunk.ts";
import { DiffArea } from "./diff_area.ts";
import { DiffStorage } from "./diff_storage.ts";
import { BlksnapError } from "./errors.ts";
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
} = {}): Promise<Setup> {
  const dir = await tempDir();
  const params = makeParams({
    chunkMinimumShift: 12,
    diffStorageMinimumSectors: 64,
    freeDiffBufferPoolSize: options.pool ?? 8,
    chunkMaximumInQueue: options.queue ?? 8,
  });
  const device = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 16 * CHUNK });
  const original = new Rng(42).bytes(16 * CHUNK);
  await device.write(0, original);
  const file = new MemoryDiffStorageFile({ hooks: options.storageHooks ?? {} });
  const storage = await DiffStorage.open({
    path: "mem",
    limitSectors: options.limitSectors ?? 10_000,
    params,
    opener: () => Promise.resolve(file),
  });
  const corruptions: number[] = [];
  const area = new DiffArea({
    device,
    storage,
    params,
    onCorrupted: (code) => corruptions.push(code),
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
      await area.close();
      await storage.close();
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
