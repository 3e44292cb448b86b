import { assertEquals, assertErrno, assertThrows, assertTrue } from "./_assert.ts";
import type { BlockDevice } from "./block_device.ts";
import { DiffArea } from "./diff_area.ts";
import { DiffStorage } from "./diff_storage.ts";
import { AssertionError } from "./errors.ts";
import { FileDevice } from "./file_device.ts";
import { makeParams } from "./params.ts";
import { Tracker } from "./tracker.ts";
import { filled, Gate, MemoryDiffStorageFile, Rng, tempDir, yieldTurns } from "./_test_util.ts";

const params = makeParams({
  trackingBlockMinimumShift: 12,
  chunkMinimumShift: 12,
  diffStorageMinimumSectors: 64,
});

async function withTracker(fn: (tracker: Tracker, device: FileDevice) => Promise<void>) {
  await using dir = await tempDir();
  using device = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 65536 });
  await fn(new Tracker({ device, params, aliases: ["259:0"] }), device);
}

async function take(tracker: Tracker): Promise<DiffArea> {
  const storage = await DiffStorage.open({
    path: "mem",
    limitSectors: 4096,
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile()),
  });
  const area = new DiffArea({ device: tracker.device, storage, params });
  await tracker.quiesce();
  tracker.takeSnapshot(area);
  tracker.resume();
  return area;
}

Deno.test("Tracker.beforeWrite() marks the CBT write map with the active number", async () => {
  await withTracker(async (tracker) => {
    assertEquals(tracker.deviceIds, new Set([tracker.deviceId, "259:0"]));
    await tracker.write(9, filled(512, 1));
    assertEquals(tracker.cbtMap.writeMap[1], 1);
    assertEquals(tracker.writesInFlight, 0);
    await tracker.discard(16, 8);
    assertEquals(tracker.cbtMap.writeMap[2], 1);
    assertEquals(tracker.isTaken, false);
  });
});

Deno.test("Tracker.beforeWrite() rejects a range outside the device with EINVAL", async () => {
  await withTracker(async (tracker) => {
    await assertErrno(() => tracker.beforeWrite(127, 2), "EINVAL");
    await assertErrno(() => tracker.beforeWrite(-1, 1), "EINVAL");
    assertEquals(tracker.writesInFlight, 0);
    assertThrows(() => tracker.endWrite(), AssertionError);
  });
});

Deno.test("Tracker.quiesce() waits for writes in flight and holds new ones until resume()", async () => {
  await withTracker(async (tracker, device) => {
    const gate = new Gate();
    device.hooks = { before: (request) => request.kind === "write" ? gate.wait() : undefined };
    let firstDone = false;
    const first = tracker.write(0, filled(512, 1)).then(() => firstDone = true);
    await yieldTurns(1);
    let quiesced = false;
    const quiescing = tracker.quiesce().then(() => quiesced = true);
    let secondStarted = false;
    const second = tracker.beforeWrite(8, 1).then(() => secondStarted = true);
    await yieldTurns(2);
    assertEquals([firstDone, quiesced, secondStarted], [false, false, false]);
    gate.open();
    await first;
    await quiescing;
    await yieldTurns(1);
    assertEquals(secondStarted, false, "held while quiesced");
    tracker.resume();
    await second;
    tracker.endWrite();
  });
});

Deno.test("Tracker images: ENODEV without a snapshot, old data with one", async () => {
  await withTracker(async (tracker) => {
    await assertErrno(() => tracker.readImage(0, new Uint8Array(512)), "ENODEV");
    assertEquals(tracker.snapshotInfo(), { errorCode: 0, image: "" });
    const before = new Rng(1).bytes(65536);
    await tracker.write(0, before);
    const area = await take(tracker);
    assertEquals(tracker.snapshotInfo(), { errorCode: 0, image: tracker.imageName });
    assertEquals(tracker.cbtMap.snapNumberActive, 2);
    await tracker.write(0, filled(65536, 0));
    const out = new Uint8Array(65536);
    await tracker.readImage(0, out);
    assertEquals(out, before);
    await tracker.releaseSnapshot();
    assertEquals(area.isClosed, true);
    await assertErrno(() => tracker.readImage(0, out), "ENODEV");
  });
});

Deno.test("Tracker.writeImage() marks both CBT maps", async () => {
  await withTracker(async (tracker) => {
    await take(tracker); // active 2, previous 1
    await tracker.writeImage(8, filled(512, 1));
    assertEquals(tracker.cbtMap.writeMap[1], 2);
    assertEquals(tracker.cbtMap.readMap[1], 1);
    assertEquals([...tracker.readCbtMap(0, 3)], [0, 1, 0]);
    await tracker.releaseSnapshot();
  });
});

Deno.test("Tracker.markDirty() checks every range before marking any", async () => {
  await withTracker(async (tracker) => {
    await assertErrno(
      () => tracker.markDirty([{ sector: 0, count: 1 }, { sector: 128, count: 1 }]),
      "EINVAL",
    );
    assertEquals(tracker.cbtMap.writeMap[0], 0);
    tracker.markDirty([{ sector: 0, count: 1 }, { sector: 120, count: 8 }]);
    assertEquals(tracker.cbtMap.writeMap[0], 1);
    assertEquals(tracker.cbtMap.writeMap[15], 1);
  });
});

Deno.test("Tracker.takeSnapshot() requires quiesced writes and resets a corrupted CBT map", async () => {
  await withTracker(async (tracker) => {
    const storage = await DiffStorage.open({
      path: "mem",
      limitSectors: 4096,
      params,
      opener: () => Promise.resolve(new MemoryDiffStorageFile()),
    });
    const area = new DiffArea({ device: tracker.device, storage, params });
    assertThrows(() => tracker.takeSnapshot(area), AssertionError, "quiesced");
    const generation = tracker.cbtMap.generationId;
    tracker.cbtMap.setCorrupted();
    await tracker.quiesce();
    tracker.takeSnapshot(area);
    tracker.resume();
    assertEquals(tracker.cbtMap.isCorrupted, false);
    assertEquals(tracker.cbtMap.snapNumberActive, 2);
    assertEquals(tracker.cbtMap.generationId !== generation, true);
    await tracker.releaseSnapshot();
  });
});

/** A device whose size can change under the tracker, as an extended original's does. */
class ResizableDevice implements BlockDevice {
  sizeSectors: number;
  readonly logicalBlockSize = 512;
  readonly deviceId = "resizable";
  readonly #inner: FileDevice;

  constructor(inner: FileDevice) {
    this.#inner = inner;
    this.sizeSectors = inner.sizeSectors;
  }
  read(sector: number, buf: Uint8Array): Promise<void> {
    return this.#inner.read(sector, buf);
  }
  write(sector: number, buf: Uint8Array): Promise<void> {
    return this.#inner.write(sector, buf);
  }
  flush(): Promise<void> {
    return this.#inner.flush();
  }
  discard(sector: number, count: number): Promise<void> {
    return this.#inner.discard(sector, count);
  }
}

Deno.test("A write past the CBT map of a grown device goes through and corrupts the map", async () => {
  await using dir = await tempDir();
  using file = await FileDevice.open({ path: `${dir.path}/dev.img`, sizeBytes: 2 * 65536 });
  const device = new ResizableDevice(file);
  device.sizeSectors = 128; // the tracker starts on 64 KiB
  const tracker = new Tracker({ device, params });
  await take(tracker);
  device.sizeSectors = 256; // the original was extended
  await tracker.write(200, filled(4096, 7));
  const onDisk = new Uint8Array(4096);
  file.readSync(200, onDisk);
  assertEquals(onDisk, filled(4096, 7), "the write reached the original");
  assertTrue(tracker.cbtMap.isCorrupted);
  assertEquals(tracker.snapshotInfo().errorCode, 0, "the snapshot is not hurt");
  // image writes do not fail either, though the map cannot be marked
  await tracker.writeImage(8, filled(512, 1));
  // outside the device is still EINVAL, before any I/O
  const writes = file.stats.writes;
  await assertErrno(() => tracker.write(256, filled(512, 1)), "EINVAL");
  await assertErrno(() => tracker.writeImage(255, filled(1024, 1)), "EINVAL");
  assertEquals(file.stats.writes, writes);
  await tracker.releaseSnapshot();
  // the next take makes a map of the new size and a new generation
  await take(tracker);
  assertEquals(tracker.cbtMap.isCorrupted, false);
  assertEquals(tracker.cbtMap.capacitySectors, 256);
  await tracker.releaseSnapshot();
});

Deno.test("Tracker.writeImage() succeeds although the CBT map is corrupted (the module ignores it)", async () => {
  await withTracker(async (tracker) => {
    await take(tracker);
    tracker.cbtMap.setCorrupted();
    await tracker.writeImage(8, filled(512, 3));
    const out = new Uint8Array(512);
    await tracker.readImage(8, out);
    assertEquals(out, filled(512, 3));
    await tracker.releaseSnapshot();
  });
});
