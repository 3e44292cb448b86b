import { assertEquals, assertErrno, assertTrue } from "./_assert.ts";
import { devIdString } from "./block_device.ts";
import { DiffStorage, openDiffStorageFile } from "./diff_storage.ts";
import { BlksnapError } from "./errors.ts";
import type { SnapshotEvent } from "./event_queue.ts";
import { makeParams } from "./params.ts";
import { Gate, MemoryDiffStorageFile, tempDir, yieldTurns } from "./_test_util.ts";

// 4 KiB chunks (8 sectors), growth portions of 64 sectors
const params = makeParams({ chunkMinimumShift: 12, diffStorageMinimumSectors: 64 });

async function open(
  path: string,
  limitSectors: number,
  events: SnapshotEvent[] = [],
  opener?: (path: string) => Promise<MemoryDiffStorageFile>,
): Promise<DiffStorage> {
  return await DiffStorage.open({
    path,
    limitSectors,
    params,
    onEvent: (event) => events.push(event),
    ...(opener === undefined ? {} : { opener }),
  });
}

Deno.test("openDiffStorageFile() is ENOENT for a missing path and EINVAL for a character device", async () => {
  await using dir = await tempDir();
  await assertErrno(() => openDiffStorageFile(`${dir.path}/missing`), "ENOENT");
  await assertErrno(() => openDiffStorageFile("/dev/null"), "EINVAL");
});

Deno.test("DiffStorage.open() refuses a limit of zero with EINVAL", async () => {
  await using dir = await tempDir();
  await assertErrno(() => open(dir.path, 0), "EINVAL");
  await assertErrno(() => open(dir.path, -8), "EINVAL");
});

Deno.test("A regular file is the storage exclusively: a second holder gets EBUSY", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/diff`;
  await Deno.writeFile(path, new Uint8Array(0));
  const storage = await open(path, 1000);
  assertEquals(storage.kind, "file");
  assertEquals(storage.deviceId, devIdString((await Deno.stat(path)).dev));
  await assertErrno(() => open(path, 1000), "EBUSY");
  await storage.close();
  const again = await open(path, 1000);
  await again.close();
});

Deno.test("DiffStorage.open() grows an empty file by one portion, within the limit", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/diff`;
  await Deno.writeFile(path, new Uint8Array(0));
  const storage = await open(path, 1000);
  assertEquals(storage.capacitySectors, 64);
  assertEquals((await Deno.stat(path)).size, 64 * 512);
  await storage.close();
  const limited = await open(path, 40);
  assertEquals(limited.capacitySectors, 64, "an existing size over half a portion is kept");
  await limited.close();
  await Deno.truncate(path, 0);
  const small = await open(path, 20);
  assertEquals(small.capacitySectors, 20);
  await small.close();
});

Deno.test("A directory holds an unnamed file that is gone from the start", async () => {
  await using dir = await tempDir();
  const storage = await open(dir.path, 1000);
  assertEquals(storage.kind, "tmpfile");
  assertEquals([...Deno.readDirSync(dir.path)], []);
  const offset = await storage.allocate(8);
  const data = new Uint8Array(4096).fill(3);
  await storage.write(offset, data);
  const out = new Uint8Array(4096);
  await storage.read(offset, out);
  assertEquals(out, data);
  await storage.close();
  assertEquals([...Deno.readDirSync(dir.path)], []);
});

Deno.test("DiffStorage hands out chunk-sized extents in order and grows at half a portion", async () => {
  const file = new MemoryDiffStorageFile();
  const events: SnapshotEvent[] = [];
  const storage = await open("mem", 1000, events, () => Promise.resolve(file));
  assertEquals(storage.capacitySectors, 64);
  assertEquals(await storage.allocate(8), 0);
  assertEquals(await storage.allocate(8), 8);
  assertEquals(await storage.allocate(8), 16);
  assertEquals(storage.requestedSectors, 64, "40 sectors left: more than half a portion");
  assertEquals(await storage.allocate(8), 24); // 32 left: half a portion
  assertEquals(storage.requestedSectors, 128);
  await storage.settled();
  assertEquals(storage.capacitySectors, 128);
  assertEquals(file.sizeBytes, 128 * 512);
  assertEquals(events, []);
});

Deno.test("DiffStorage never grows past its limit and raises no_space there", async () => {
  const file = new MemoryDiffStorageFile();
  const events: SnapshotEvent[] = [];
  const storage = await open("mem", 100, events, () => Promise.resolve(file));
  const offsets: number[] = [];
  for (;;) {
    const offset = await storage.allocate(8);
    if (offset < 0) break;
    offsets.push(offset);
    await storage.settled();
  }
  assertEquals(storage.capacitySectors, 100);
  assertEquals(file.allocations, [64 * 512, 100 * 512]);
  assertEquals(offsets.length, 12); // 96 sectors
  assertTrue(storage.isOverflowed);
  assertEquals(await storage.allocate(8), -1, "and from then on");
  assertEquals(events.map((event) => event.code), ["no_space"]);
});

Deno.test("A failed fallocate stops handing out space the storage does not have", async () => {
  const file = new MemoryDiffStorageFile();
  const events: SnapshotEvent[] = [];
  const storage = await open("mem", 1000, events, () => Promise.resolve(file));
  file.hooks = {
    before(request) {
      if (request.kind === "allocate") throw new BlksnapError("ENOSPC", "injected");
    },
  };
  let count = 0;
  while ((await storage.allocate(8)) >= 0) {
    count++;
    await storage.settled();
  }
  assertEquals(count, 8, "only the 64 sectors that exist");
  assertEquals(storage.capacitySectors, 64);
  assertEquals(events.map((event) => event.code), ["no_space"]);
});

Deno.test("A block device storage does not grow: no_space when half full", async () => {
  const file = new MemoryDiffStorageFile({ kind: "blockdev", sizeBytes: 48 * 512 });
  const events: SnapshotEvent[] = [];
  const storage = await open("bdev", 1000, events, () => Promise.resolve(file));
  assertEquals(storage.capacitySectors, 48);
  assertEquals(await storage.allocate(8), 0);
  assertEquals(events, []);
  assertEquals(await storage.allocate(8), 8); // 32 left: half a portion
  assertEquals(events.map((event) => event.code), ["no_space"]);
  for (let i = 2; i < 6; i++) assertEquals(await storage.allocate(8), i * 8);
  assertEquals(await storage.allocate(8), -1);
  assertEquals(file.allocations, []);
});

Deno.test("DiffStorage asserts I/O outside the extents it handed out", async () => {
  const storage = await open("mem", 1000, [], () => Promise.resolve(new MemoryDiffStorageFile()));
  let failed = false;
  try {
    await storage.write(0, new Uint8Array(512));
  } catch {
    failed = true;
  }
  assertTrue(failed);
  await storage.close();
});

Deno.test("An extent that does not fit while the storage grows waits for the growth", async () => {
  const gate = new Gate();
  const file = new MemoryDiffStorageFile();
  const storage = await open("mem", 1000, [], () => Promise.resolve(file));
  file.hooks = { before: (request) => request.kind === "allocate" ? gate.wait() : undefined };
  for (let i = 0; i < 4; i++) await storage.allocate(8); // half full: growth to 128 starts
  assertEquals(storage.requestedSectors, 128);
  assertEquals(storage.capacitySectors, 64);
  for (let i = 4; i < 16; i++) assertEquals(await storage.allocate(8), i * 8);
  let offset = -2;
  const waiting = storage.allocate(8).then((value) => offset = value);
  await yieldTurns(2);
  assertEquals(offset, -2, "waits for the growth");
  gate.open();
  await waiting;
  assertEquals(offset, 128);
  assertEquals(storage.isOverflowed, false);
  await storage.settled();
  assertEquals(storage.capacitySectors, 192);
  await storage.close();
});
