/**
 * Fault injection through the file-backed stand-ins: whatever fails in the
 * snapshot machinery, every write to the tracked device completes and the
 * original ends up with exactly the data written to it (invariant 3); the
 * snapshot is marked corrupted, raises an event, and its image fails with EIO.
 */

import {
  BlksnapError,
  FileDevice,
  type IoHooks,
  makeParams,
  openDiffStorageFile,
  SECTOR_SIZE,
  type SnapshotEvent,
  Snapshots,
  Tracker,
} from "../../lib/engine/mod.ts";
import { assertEquals, assertErrno, assertTrue } from "../../lib/engine/_assert.ts";
import { randomDelays, Rng, seedFromEnv, tempDir } from "../../lib/engine/_test_util.ts";

const DEVICE_BYTES = 256 * 1024;
const DEVICE_SECTORS = DEVICE_BYTES / SECTOR_SIZE;
const CHUNK_SECTORS = 8;

const params = makeParams({
  trackingBlockMinimumShift: 12,
  chunkMinimumShift: 12,
  freeDiffBufferPoolSize: 4,
  chunkMaximumInQueue: 3,
  diffStorageMinimumSectors: 64,
});

interface Scenario {
  /** Hooks of the difference storage. */
  storageHooks?: IoHooks;
  /** Hooks of the original device, besides random delays. */
  deviceFault?: (kind: string) => void;
  limitSectors?: number;
  /** Use a regular file rather than a directory. */
  regularFile?: boolean;
}

interface Outcome {
  errorCode: number;
  events: SnapshotEvent[];
  storageBytes: number;
}

/**
 * Takes a snapshot of a random device, then bursts 320 random writes (waves
 * of 8 concurrent, non-overlapping ones), and checks the original.
 */
async function burst(scenario: Scenario): Promise<Outcome> {
  const seed = seedFromEnv();
  const rng = new Rng(seed);
  try {
    await using dir = await tempDir();
    const delays = randomDelays(rng);
    using device = await FileDevice.open({
      path: `${dir.path}/dev.img`,
      sizeBytes: DEVICE_BYTES,
      deviceId: "7:0",
      hooks: {
        async before(request) {
          await delays.before!(request);
          scenario.deviceFault?.(request.kind);
        },
      },
    });
    const tracker = new Tracker({ device, params });
    const model = rng.bytes(DEVICE_BYTES);
    await tracker.write(0, model);
    const snapshots = new Snapshots({
      params,
      opener: (path) => openDiffStorageFile(path, { hooks: scenario.storageHooks ?? {} }),
    });
    let storagePath = dir.path;
    if (scenario.regularFile === true) {
      storagePath = `${dir.path}/diff`;
      await Deno.writeFile(storagePath, new Uint8Array(0));
    }
    const id = await snapshots.create({
      diffStoragePath: storagePath,
      limitSectors: scenario.limitSectors ?? 4096,
    });
    await snapshots.addDevice(id, tracker);
    await snapshots.take(id);
    const image = model.slice();

    let writes = 0;
    for (let wave = 0; wave < 40; wave++) {
      const used: [number, number][] = [];
      const running: Promise<void>[] = [];
      while (running.length < 8) {
        const count = rng.range(1, 3 * CHUNK_SECTORS);
        const sector = rng.int(DEVICE_SECTORS - count + 1);
        if (used.some(([s, c]) => sector < s + c && s < sector + count)) continue;
        used.push([sector, count]);
        const data = rng.bytes(count * SECTOR_SIZE);
        running.push(
          tracker.write(sector, data).then(() => {
            model.set(data, sector * SECTOR_SIZE);
            writes++;
          }),
        );
      }
      // a write to the original never fails because of the snapshot
      await Promise.all(running);
    }
    assertEquals(writes, 320);
    await tracker.diffArea!.settled();
    const onDisk = new Uint8Array(DEVICE_BYTES);
    device.readSync(0, onDisk);
    assertTrue(
      onDisk.every((b, i) => b === model[i]),
      "the original holds exactly the data written to it",
    );

    const errorCode = tracker.snapshotInfo().errorCode;
    if (errorCode !== 0) {
      await assertErrno(() => tracker.readImage(0, new Uint8Array(4096)), "EIO");
    } else {
      const out = new Uint8Array(DEVICE_BYTES);
      await tracker.readImage(0, out);
      assertTrue(out.every((b, i) => b === image[i]), "an intact image is the original at take");
    }
    const events: SnapshotEvent[] = [];
    for (;;) {
      const event = await snapshots.waitEvent(id, 0);
      if (event === null) break;
      events.push(event);
    }
    const storageBytes = scenario.regularFile === true ? (await Deno.stat(storagePath)).size : -1;
    await snapshots.destroy(id);
    return { errorCode, events, storageBytes };
  } catch (error) {
    console.error(`Fault test failed: BLKSNAP_SEED=${seed}`);
    throw error;
  }
}

Deno.test("Without faults the burst leaves an intact image", async () => {
  const outcome = await burst({});
  assertEquals(outcome.errorCode, 0);
  assertEquals(outcome.events, []);
});

Deno.test("EIO on the difference storage mid-burst: corrupted, writes go on untouched", async () => {
  let writes = 0;
  const outcome = await burst({
    storageHooks: {
      before(request) {
        if (request.kind === "write" && ++writes > 10) {
          throw new BlksnapError("EIO", "injected EIO");
        }
      },
    },
  });
  assertEquals(outcome.errorCode, -5);
  assertEquals(outcome.events.map((event) => event.code), ["corrupted"]);
  const event = outcome.events[0]!;
  assertEquals(event.code === "corrupted" && [event.deviceId, event.errorCode], ["7:0", 5]);
});

Deno.test("ENOSPC from fallocate: no_space, then corrupted with -ENOSPC", async () => {
  let allocations = 0;
  const outcome = await burst({
    storageHooks: {
      before(request) {
        // the first portion (made at create) succeeds, every growth fails
        if (request.kind === "allocate" && ++allocations > 1) {
          throw new BlksnapError("ENOSPC", "injected ENOSPC");
        }
      },
    },
  });
  assertEquals(outcome.errorCode, -28);
  assertEquals(outcome.events.map((event) => event.code), ["no_space", "corrupted"]);
});

Deno.test("The limit reached in the middle of a write burst: the storage stays within it", async () => {
  const limitSectors = 10 * CHUNK_SECTORS + 4;
  const outcome = await burst({ limitSectors, regularFile: true });
  assertEquals(outcome.errorCode, -28);
  assertEquals(outcome.events.map((event) => event.code), ["no_space", "corrupted"]);
  assertTrue(outcome.storageBytes <= limitSectors * SECTOR_SIZE, `${outcome.storageBytes} bytes`);
});

Deno.test("EIO reading the original during a copy: corrupted, the write itself succeeds", async () => {
  let reads = 0;
  const outcome = await burst({
    deviceFault(kind) {
      if (kind === "read" && ++reads === 20) throw new BlksnapError("EIO", "injected EIO");
    },
  });
  assertEquals(outcome.errorCode, -5);
  assertEquals(outcome.events.map((event) => event.code), ["corrupted"]);
});
