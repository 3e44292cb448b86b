import { assertEquals, assertErrno, assertTrue } from "./_assert.ts";
import { devTKey } from "../dev_t.ts";
import { BlksnapError } from "./errors.ts";
import { FileDevice } from "./file_device.ts";
import { makeParams } from "./params.ts";
import { Snapshots } from "./snapshot.ts";
import { Tracker } from "./tracker.ts";
import { filled, Gate, MemoryDiffStorageFile, Rng, tempDir, yieldTurns } from "./_test_util.ts";

const params = makeParams({
  trackingBlockMinimumShift: 12,
  chunkMinimumShift: 12,
  diffStorageMinimumSectors: 64,
});
const SIZE = 65536;

interface World extends AsyncDisposable {
  dir: string;
  snapshots: Snapshots;
  devices: FileDevice[];
  trackers: Tracker[];
  logs: string[];
}

async function world(deviceCount = 2): Promise<World> {
  const dir = await tempDir();
  const logs: string[] = [];
  const snapshots = new Snapshots({ params, log: (message) => logs.push(message) });
  const devices: FileDevice[] = [];
  const trackers: Tracker[] = [];
  for (let i = 0; i < deviceCount; i++) {
    const device = await FileDevice.open({
      path: `${dir.path}/dev${i}.img`,
      sizeBytes: SIZE,
      deviceId: `7:${i}`,
    });
    await device.write(0, new Rng(i + 1).bytes(SIZE));
    devices.push(device);
    trackers.push(new Tracker({ device, params }));
  }
  return {
    dir: dir.path,
    snapshots,
    devices,
    trackers,
    logs,
    async [Symbol.asyncDispose]() {
      await snapshots.destroyAll();
      for (const device of devices) device.close();
      await dir[Symbol.asyncDispose]();
    },
  };
}

async function imageOf(tracker: Tracker): Promise<Uint8Array> {
  const out = new Uint8Array(SIZE);
  await tracker.readImage(0, out);
  return out;
}

function contents(device: FileDevice): Uint8Array {
  const out = new Uint8Array(SIZE);
  device.readSync(0, out);
  return out;
}

Deno.test("Snapshots.create() returns a new UUID that collect() lists", async () => {
  await using w = await world();
  const a = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  const b = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  assertTrue(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(a));
  assertEquals(w.snapshots.collect(), [a, b]);
  await w.snapshots.destroy(a);
  assertEquals(w.snapshots.collect(), [b]);
});

Deno.test("Snapshots.create() errors: limit of zero EINVAL, missing storage ENOENT", async () => {
  await using w = await world();
  await assertErrno(
    () => w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 0 }),
    "EINVAL",
  );
  await assertErrno(
    () => w.snapshots.create({ diffStoragePath: `${w.dir}/nope/x`, limitSectors: 1024 }),
    "ENOENT",
  );
  await assertErrno(() => w.snapshots.create({ diffStoragePath: "", limitSectors: 1 }), "EINVAL");
  assertEquals(w.snapshots.collect(), []);
});

Deno.test("Snapshots: an unknown id is ESRCH (ENODEV for destroy, as the module does)", async () => {
  await using w = await world();
  const id = crypto.randomUUID();
  await assertErrno(() => w.snapshots.take(id), "ESRCH");
  await assertErrno(() => w.snapshots.addDevice(id, w.trackers[0]!), "ESRCH");
  await assertErrno(() => w.snapshots.waitEvent(id, 0), "ESRCH");
  await assertErrno(() => w.snapshots.destroy(id), "ENODEV");
});

Deno.test("Snapshots.take() errors: no devices ENODEV, twice EALREADY", async () => {
  await using w = await world();
  const id = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  await assertErrno(() => w.snapshots.take(id), "ENODEV");
  await w.snapshots.addDevice(id, w.trackers[0]!);
  await w.snapshots.take(id);
  await assertErrno(() => w.snapshots.take(id), "EALREADY");
});

Deno.test("Snapshots.addDevice() errors: taken EBUSY, twice EALREADY, other snapshot EBUSY", async () => {
  await using w = await world(3);
  const a = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  const b = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  await w.snapshots.addDevice(a, w.trackers[0]!);
  await assertErrno(() => w.snapshots.addDevice(a, w.trackers[0]!), "EALREADY");
  await assertErrno(() => w.snapshots.addDevice(b, w.trackers[0]!), "EBUSY");
  await w.snapshots.take(a);
  await assertErrno(() => w.snapshots.addDevice(a, w.trackers[1]!), "EBUSY");
  // a failed request changes nothing
  assertEquals(w.trackers[1]!.snapshotId, null);
  await w.snapshots.addDevice(b, w.trackers[1]!);
  assertEquals(w.snapshots.trackers(b), [w.trackers[1]!]);
});

Deno.test("A device holding the difference storage cannot join the snapshot", async () => {
  await using w = await world(1);
  const id = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  const holder = devTKey((await Deno.stat(w.dir)).dev);
  const device = w.devices[0]!;
  const tracker = new Tracker({ device, params, aliases: [holder] });
  await assertErrno(() => w.snapshots.addDevice(id, tracker), "EBUSY");
  assertEquals(tracker.snapshotId, null);
});

Deno.test("Snapshots.take() switches every device at one instant", async () => {
  await using w = await world(2);
  const [a, b] = w.trackers as [Tracker, Tracker];
  const [da, db] = w.devices as [FileDevice, FileDevice];
  const id = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  await w.snapshots.addDevice(id, a);
  await w.snapshots.addDevice(id, b);
  // a write to A is in flight when the take starts: it belongs before the instant
  const gate = new Gate();
  da.hooks = { before: (request) => request.kind === "write" ? gate.wait() : undefined };
  const inFlight = a.write(0, filled(4096, 0xa1));
  await yieldTurns(1);
  let taken = false;
  const taking = w.snapshots.take(id).then(() => taken = true);
  await yieldTurns(1);
  // a write to B issued during the take belongs after it
  const during = b.write(0, filled(4096, 0xb2));
  await yieldTurns(2);
  assertEquals(taken, false, "the take waits for the write in flight");
  gate.open();
  await Promise.all([inFlight, taking, during]);
  const imageA = await imageOf(a);
  const imageB = await imageOf(b);
  assertEquals(imageA.subarray(0, 4096), filled(4096, 0xa1));
  assertEquals(imageB.subarray(0, 4096), new Rng(2).bytes(SIZE).subarray(0, 4096));
  assertEquals(contents(db).subarray(0, 4096), filled(4096, 0xb2));
  assertEquals([a.cbtMap.readMap[0], a.cbtMap.writeMap[0]], [1, 1]);
  assertEquals([b.cbtMap.readMap[0], b.cbtMap.writeMap[0]], [0, 2]);
});

Deno.test("Snapshots.take() freezes and thaws around the switch; failures only warn", async () => {
  await using w = await world(2);
  const id = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  for (const tracker of w.trackers) await w.snapshots.addDevice(id, tracker);
  const calls: string[] = [];
  await w.snapshots.take(id, {
    freeze: (tracker) => {
      calls.push(`freeze ${tracker.deviceId} taken=${tracker.isTaken}`);
      if (tracker.deviceId === "7:1") throw new BlksnapError("EBUSY", "busy fs");
      return Promise.resolve();
    },
    thaw: (tracker) => {
      calls.push(`thaw ${tracker.deviceId} taken=${tracker.isTaken}`);
      return Promise.resolve();
    },
  });
  assertEquals(calls, [
    "freeze 7:0 taken=false",
    "freeze 7:1 taken=false",
    "thaw 7:0 taken=true",
    "thaw 7:1 taken=true",
  ]);
  assertEquals(w.logs.some((line) => line.includes('Failed to freeze "7:1"')), true);
});

Deno.test("Snapshots.destroy() removes the images and the storage; CBT maps stay readable", async () => {
  await using w = await world(1);
  const tracker = w.trackers[0]!;
  const id = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  await w.snapshots.addDevice(id, tracker);
  await tracker.write(0, filled(512, 1));
  await w.snapshots.take(id);
  await tracker.write(8, filled(512, 1));
  assertEquals(tracker.snapshotInfo().image, "blksnap-image_7:0");
  await w.snapshots.destroy(id);
  await assertErrno(() => tracker.readImage(0, new Uint8Array(512)), "ENODEV");
  assertEquals(tracker.snapshotInfo(), { errorCode: 0, image: "" });
  assertEquals([...tracker.readCbtMap(0, 2)], [1, 0]);
  assertEquals(tracker.cbtInfo().changesNumber, 1);
  assertEquals([...Deno.readDirSync(w.dir)].map((e) => e.name).sort(), ["dev0.img"]);
  // the device may join a new snapshot
  const again = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  await w.snapshots.addDevice(again, tracker);
  await w.snapshots.take(again);
  assertEquals([...tracker.readCbtMap(0, 2)], [1, 2]);
});

Deno.test("Several snapshots of different devices live at once", async () => {
  await using w = await world(2);
  const [a, b] = w.trackers as [Tracker, Tracker];
  const sa = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  const sb = await w.snapshots.create({ diffStoragePath: w.dir, limitSectors: 1024 });
  await w.snapshots.addDevice(sa, a);
  await w.snapshots.take(sa);
  await a.write(0, filled(SIZE, 1));
  await w.snapshots.addDevice(sb, b);
  await w.snapshots.take(sb);
  await b.write(0, filled(SIZE, 2));
  await a.write(0, filled(SIZE, 3));
  assertEquals(await imageOf(a), new Rng(1).bytes(SIZE));
  assertEquals(await imageOf(b), new Rng(2).bytes(SIZE));
  await w.snapshots.destroy(sa);
  assertEquals(await imageOf(b), new Rng(2).bytes(SIZE));
});

Deno.test("Snapshots.waitEvent() times out with null and reports an overflow as corrupted", async () => {
  await using w = await world(1);
  const tracker = w.trackers[0]!;
  const files: MemoryDiffStorageFile[] = [];
  const snapshots = new Snapshots({
    params,
    opener: () => {
      const file = new MemoryDiffStorageFile({ deviceId: "8:1" });
      files.push(file);
      return Promise.resolve(file);
    },
  });
  const id = await snapshots.create({ diffStoragePath: "mem", limitSectors: 16 });
  await snapshots.addDevice(id, tracker);
  await snapshots.take(id);
  assertEquals(await snapshots.waitEvent(id, 5), null);
  const waiting = snapshots.waitEvent(id, 10_000);
  await tracker.write(0, filled(SIZE, 9)); // 16 chunks into 2 chunks of space
  await tracker.diffArea!.settled();
  const events = [await waiting, await snapshots.waitEvent(id, 1000)];
  const codes = events.map((event) => event?.code).sort();
  assertEquals(codes, ["corrupted", "no_space"]);
  const corrupted = events.find((event) => event?.code === "corrupted");
  assertEquals(corrupted?.code === "corrupted" && corrupted.errorCode, 28);
  assertEquals(corrupted?.code === "corrupted" && corrupted.deviceId, "7:0");
  assertEquals(tracker.snapshotInfo().errorCode, -28);
  await assertErrno(() => tracker.readImage(0, new Uint8Array(512)), "EIO");
  assertEquals(contents(w.devices[0]!), filled(SIZE, 9), "the original has every write");
  const late = snapshots.waitEvent(id, 10_000);
  await snapshots.destroy(id);
  assertEquals(await late, null);
  assertEquals(files[0]!.closed, true);
});

Deno.test("At the 255th take a device's CBT map starts a new generation, as the module's does", async () => {
  await using w = await world(1);
  const tracker = w.trackers[0]!;
  const snapshots = new Snapshots({
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile()),
  });
  const generation = tracker.cbtInfo().generationId;
  for (let i = 1; i <= 255; i++) {
    const id = await snapshots.create({ diffStoragePath: "mem", limitSectors: 1024 });
    await snapshots.addDevice(id, tracker);
    await snapshots.take(id);
    await tracker.write((i % 16) * 8, filled(512, i));
    if (i < 255) {
      assertEquals(tracker.cbtInfo().changesNumber, i);
      assertEquals(tracker.cbtInfo().generationId, generation);
    }
    await snapshots.destroy(id);
  }
  const info = tracker.cbtInfo();
  // previous 255, active 1, a new generation: a backup tool must take a full backup
  assertEquals(info.changesNumber, 255);
  assertTrue(info.generationId !== generation);
  assertEquals(tracker.cbtMap.snapNumberActive, 1);
  // the read map is the 254th take's, not refreshed at the wrap: the write
  // after the 253rd take (marked 254) is in it, the one after the 254th
  // (marked 255) is not, only the block's older change (239)
  const read = [...tracker.readCbtMap(0, 16)];
  assertEquals(read[253 % 16], 254);
  assertEquals(read[254 % 16], 239);
  // the write after the 255th take is marked 1 in the new generation
  assertEquals(tracker.cbtMap.writeMap[255 % 16], 1);
  // markdirtyblock after the wrap marks the read map with previous, 255
  tracker.markDirty([{ sector: 0, count: 1 }]);
  assertEquals(tracker.readCbtMap(0, 1)[0], 255);
});

Deno.test("A log that throws fails no write to the original and loses no event", async () => {
  await using w = await world(1);
  const tracker = w.trackers[0]!;
  const snapshots = new Snapshots({
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile({ deviceId: "8:1" })),
    log() {
      throw new Deno.errors.BrokenPipe("stderr is closed");
    },
  });
  const id = await snapshots.create({ diffStoragePath: "mem", limitSectors: 16 });
  await snapshots.addDevice(id, tracker);
  await snapshots.take(id, {
    freeze: () => Promise.reject(new Error("no freeze")), // logged: the log throws too
  });
  await tracker.write(0, filled(SIZE, 9)); // overflows: logs and events on the way
  await tracker.diffArea!.settled();
  assertEquals(contents(w.devices[0]!), filled(SIZE, 9));
  const codes = [await snapshots.waitEvent(id, 0), await snapshots.waitEvent(id, 0)]
    .map((event) => event?.code).sort();
  assertEquals(codes, ["corrupted", "no_space"]);
  await snapshots.destroy(id);
});
