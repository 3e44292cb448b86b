import { assertEquals, assertErrno, assertTrue } from "./_assert.ts";
import { devTKey } from "../dev_t.ts";
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
  assertEquals(storage.deviceId, devTKey((await Deno.stat(path)).dev));
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

Deno.test("A growth whose fallocate throws synchronously ends: allocate() overflows, never spins", async () => {
  // The livelock spins in microtasks, so no timer could stop it here: run it
  // in a worker and give up on the worker after a while.
  const source = `
    import { DiffStorage } from "${new URL("./diff_storage.ts", import.meta.url)}";
    import { BlksnapError } from "${new URL("./errors.ts", import.meta.url)}";
    import { makeParams } from "${new URL("./params.ts", import.meta.url)}";
    let size = 0;
    let growths = 0;
    const file = {
      kind: "file", path: "sync", deviceId: "0:1",
      get sizeBytes() { return size; },
      read: () => Promise.resolve(), write: () => Promise.resolve(),
      // e.g. an FFI fallocate wrapper that throws before returning a promise
      allocate(length) {
        if (growths++ > 0) throw new BlksnapError("ENOSPC", "synchronous ENOSPC");
        size = length;
        return Promise.resolve();
      },
      close: () => Promise.resolve(),
    };
    const params = makeParams({ chunkMinimumShift: 12, diffStorageMinimumSectors: 64 });
    const storage = await DiffStorage.open({
      path: "sync", limitSectors: 10000, params, opener: () => Promise.resolve(file),
    });
    const offsets = [];
    for (let i = 0; i < 9; i++) offsets.push(await storage.allocate(8));
    await storage.close();
    postMessage(offsets);
  `;
  const url = URL.createObjectURL(new Blob([source], { type: "application/javascript" }));
  const worker = new Worker(url, { type: "module" });
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const offsets = await new Promise((resolve, reject) => {
      worker.onmessage = (event) => resolve(event.data);
      worker.onerror = (event) => {
        event.preventDefault();
        reject(new Error(event.message));
      };
      timer = setTimeout(() => reject(new Error("allocate() livelocked")), 10_000);
    });
    assertEquals(offsets, [0, 8, 16, 24, 32, 40, 48, 56, -1]);
  } finally {
    clearTimeout(timer);
    worker.terminate();
    URL.revokeObjectURL(url);
  }
});

Deno.test("Callbacks that throw never fail an allocation: a log's failure is dropped, an event's logged", async () => {
  const logs: string[] = [];
  const throwingLog = await DiffStorage.open({
    path: "mem",
    limitSectors: 64,
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile()),
    log() {
      throw new Deno.errors.BrokenPipe("stderr is closed");
    },
  });
  for (let i = 0; i < 8; i++) assertEquals(await throwingLog.allocate(8), i * 8);
  assertEquals(await throwingLog.allocate(8), -1);
  await throwingLog.close();
  const throwingEvent = await DiffStorage.open({
    path: "mem",
    limitSectors: 64,
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile()),
    log: (message) => logs.push(message),
    onEvent() {
      throw new Error("event queue gone");
    },
  });
  for (let i = 0; i < 8; i++) assertEquals(await throwingEvent.allocate(8), i * 8);
  assertTrue(logs.some((line) => line.includes("event queue gone")), logs.join("\n"));
  await throwingEvent.close();
});

Deno.test("An allocation waiting for a growth that makes no progress overflows after cow_stall_timeout_ms", async () => {
  const stalled = makeParams({
    chunkMinimumShift: 12,
    diffStorageMinimumSectors: 64,
    cowStallTimeoutMs: 30,
  });
  const gate = new Gate();
  const file = new MemoryDiffStorageFile();
  const events: SnapshotEvent[] = [];
  const storage = await DiffStorage.open({
    path: "mem",
    limitSectors: 1000,
    params: stalled,
    opener: () => Promise.resolve(file),
    onEvent: (event) => events.push(event),
  });
  file.hooks = { before: (request) => request.kind === "allocate" ? gate.wait() : undefined };
  for (let i = 0; i < 16; i++) assertEquals(await storage.allocate(8), i * 8);
  const start = performance.now();
  assertEquals(await storage.allocate(8), -1, "gives the growth up");
  const waitedMs = performance.now() - start;
  assertTrue(waitedMs >= 25 && waitedMs < 1000, `waited ${waitedMs.toFixed(0)} ms`);
  assertEquals(storage.isOverflowed, true);
  assertEquals(events.map((event) => event.code), ["no_space"]);
  assertEquals(await storage.allocate(8), -1, "and from then on");
  gate.open();
  await storage.close();
});

Deno.test("A slow growth that ends within cow_stall_timeout_ms is waited for", async () => {
  const slow = makeParams({
    chunkMinimumShift: 12,
    diffStorageMinimumSectors: 64,
    cowStallTimeoutMs: 200,
  });
  const file = new MemoryDiffStorageFile();
  const storage = await DiffStorage.open({
    path: "mem",
    limitSectors: 1000,
    params: slow,
    opener: () => Promise.resolve(file),
  });
  file.hooks = {
    before: (request) =>
      request.kind === "allocate" ? new Promise((resolve) => setTimeout(resolve, 20)) : undefined,
  };
  for (let i = 0; i < 40; i++) assertEquals(await storage.allocate(8), i * 8);
  assertEquals(storage.isOverflowed, false);
  await storage.close();
});
