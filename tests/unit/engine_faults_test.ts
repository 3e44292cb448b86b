/**
 * Fault injection through the file-backed stand-ins: whatever fails in the
 * snapshot machinery, every write to the tracked device completes and the
 * original ends up with exactly the data written to it (invariant 3); the
 * snapshot is marked corrupted, raises an event, and its image fails with EIO.
 * Image reads and writes run all along, while the faults strike; one test
 * destroys the snapshot with all of it in flight.
 */

import {
  BlksnapError,
  FileDevice,
  type IoHooks,
  makeParams,
  openDiffStorageFile,
  type Params,
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

const baseParams: Partial<Params> = {
  trackingBlockMinimumShift: 12,
  chunkMinimumShift: 12,
  freeDiffBufferPoolSize: 4,
  chunkMaximumInQueue: 3,
  diffStorageMinimumSectors: 64,
};

/** Off while a burst checks its outcome: hooks of scenarios inject faults only while it is on. */
let faultsActive = true;

interface Scenario {
  /** Hooks of the difference storage (faults only while `faultsActive`). */
  storageHooks?: IoHooks;
  /** Hooks of the original device, besides random delays. */
  deviceFault?: (kind: string) => void;
  limitSectors?: number;
  /** Use a regular file rather than a directory. */
  regularFile?: boolean;
  params?: Partial<Params>;
  /** Image reads may fail with EIO although the snapshot is intact (faulty storage reads). */
  imageReadsMayFail?: boolean;
  /** Image writes may fail with EIO although the snapshot is intact (faulty storage writes). */
  imageWritesMayFail?: boolean;
  /** Destroy the snapshot in the middle of this wave, with everything in flight. */
  destroyAtWave?: number;
}

interface Outcome {
  errorCode: number;
  events: SnapshotEvent[];
  storageBytes: number;
  imageReads: number;
  imageErrors: number;
  /** The longest a single write to the original took, in ms. */
  slowestWriteMs: number;
}

/**
 * Takes a snapshot of a device, then bursts 320 random writes (waves of 8
 * concurrent, non-overlapping ones) with 3 image reads or writes in each
 * wave, and checks the original and the image.
 */
async function burst(scenario: Scenario): Promise<Outcome> {
  const seed = seedFromEnv();
  const rng = new Rng(seed);
  try {
    await using dir = await tempDir();
    const params = makeParams({ ...baseParams, ...scenario.params });
    faultsActive = true;
    const delays = randomDelays(rng);
    using device = await FileDevice.open({
      path: `${dir.path}/dev.img`,
      sizeBytes: DEVICE_BYTES,
      deviceId: "7:0",
      pieceSectors: 4,
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
    const area = tracker.diffArea!;
    const image = model.slice();
    let imageUnknown = false;
    let destroying: Promise<void> | null = null;
    let imageReads = 0;
    let imageErrors = 0;
    let slowestWriteMs = 0;

    const imageError = (error: unknown, what: "read" | "write") => {
      imageErrors++;
      if (!(error instanceof BlksnapError)) throw error;
      if (error.code === "ENODEV" && destroying !== null) return;
      if (error.code === "EIO" && area.isCorrupted) return;
      if (error.code === "EIO" && what === "read" && scenario.imageReadsMayFail === true) return;
      if (error.code === "EIO" && what === "write" && scenario.imageWritesMayFail === true) return;
      throw error;
    };

    let writes = 0;
    for (let wave = 0; wave < 40; wave++) {
      const used: [number, number][] = [];
      const imageUsed: [number, number][] = [];
      const running: Promise<void>[] = [];
      if (wave === scenario.destroyAtWave) {
        running.push(
          destroying = (async () => {
            await delays.before!({ kind: "flush", offsetBytes: 0, lengthBytes: 0 });
            await snapshots.destroy(id);
          })(),
        );
      }
      for (let inWave = 0; inWave < 8;) {
        const count = rng.range(1, 3 * CHUNK_SECTORS);
        const sector = rng.int(DEVICE_SECTORS - count + 1);
        if (used.some(([s, c]) => sector < s + c && s < sector + count)) continue;
        used.push([sector, count]);
        inWave++;
        const data = rng.bytes(count * SECTOR_SIZE);
        const start = performance.now();
        running.push(
          tracker.write(sector, data).then(() => {
            slowestWriteMs = Math.max(slowestWriteMs, performance.now() - start);
            model.set(data, sector * SECTOR_SIZE);
            writes++;
          }),
        );
      }
      for (let i = 0; i < 3 && destroying === null; i++) {
        const count = rng.range(1, 3 * CHUNK_SECTORS);
        const sector = rng.int(DEVICE_SECTORS - count + 1);
        if (imageUsed.some(([s, c]) => sector < s + c && s < sector + count)) continue;
        imageUsed.push([sector, count]);
        if (rng.chance(0.6)) {
          const expected = image.slice(sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
          const out = new Uint8Array(count * SECTOR_SIZE);
          running.push(
            tracker.readImage(sector, out).then(() => {
              imageReads++;
              if (!imageUnknown) {
                assertTrue(out.every((b, j) => b === expected[j]), `image ${sector}+${count}`);
              }
            }, (error) => imageError(error, "read")),
          );
        } else {
          const data = rng.bytes(count * SECTOR_SIZE);
          running.push(
            tracker.writeImage(sector, data).then(
              () => image.set(data, sector * SECTOR_SIZE),
              (error) => {
                imageUnknown = true;
                imageError(error, "write");
              },
            ),
          );
        }
      }
      // a write to the original never fails because of the snapshot
      await Promise.all(running);
    }
    assertEquals(writes, 320);
    if (destroying === null) await tracker.diffArea!.settled();
    faultsActive = false;
    const onDisk = new Uint8Array(DEVICE_BYTES);
    device.readSync(0, onDisk);
    assertTrue(
      onDisk.every((b, i) => b === model[i]),
      "the original holds exactly the data written to it",
    );

    const errorCode = area.errorCode;
    const events: SnapshotEvent[] = [];
    if (destroying !== null) {
      assertEquals(tracker.isTaken, false);
      assertEquals(area.isClosed, true);
      await assertErrno(() => tracker.readImage(0, new Uint8Array(4096)), "ENODEV");
      return { errorCode, events, storageBytes: -1, imageReads, imageErrors, slowestWriteMs };
    }
    if (errorCode !== 0) {
      await assertErrno(() => tracker.readImage(0, new Uint8Array(4096)), "EIO");
    } else if (!imageUnknown) {
      const out = new Uint8Array(DEVICE_BYTES);
      await tracker.readImage(0, out);
      assertTrue(out.every((b, i) => b === image[i]), "an intact image is the original at take");
    }
    for (;;) {
      const event = await snapshots.waitEvent(id, 0);
      if (event === null) break;
      events.push(event);
    }
    const storageBytes = scenario.regularFile === true ? (await Deno.stat(storagePath)).size : -1;
    await snapshots.destroy(id);
    return { errorCode, events, storageBytes, imageReads, imageErrors, slowestWriteMs };
  } catch (error) {
    console.error(`Fault test failed: BLKSNAP_SEED=${seed}`);
    throw error;
  }
}

Deno.test("Without faults the burst leaves an intact image", async () => {
  const outcome = await burst({});
  assertEquals(outcome.errorCode, 0);
  assertEquals(outcome.events, []);
  assertEquals(outcome.imageErrors, 0);
  assertTrue(outcome.imageReads > 30);
});

Deno.test("EIO on the difference storage mid-burst: corrupted, writes go on untouched", async () => {
  let writes = 0;
  const outcome = await burst({
    imageWritesMayFail: true,
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
    imageReadsMayFail: true, // image reads of the original fail too
    deviceFault(kind) {
      if (faultsActive && kind === "read" && ++reads >= 20) {
        throw new BlksnapError("EIO", "injected EIO");
      }
    },
  });
  assertEquals(outcome.errorCode, -5);
  assertEquals(outcome.events.map((event) => event.code), ["corrupted"]);
});

Deno.test("EIO reading the difference storage: image reads fail, the snapshot stays intact", async () => {
  let reads = 0;
  const outcome = await burst({
    imageReadsMayFail: true,
    storageHooks: {
      before(request) {
        if (faultsActive && request.kind === "read" && ++reads % 3 === 0) {
          throw new BlksnapError("EIO", "injected EIO");
        }
      },
    },
  });
  assertEquals(outcome.errorCode, 0);
  assertEquals(outcome.events, []);
});

Deno.test("Stores that hang past cow_stall_timeout_ms: corrupted with -EIO, writes wait no longer", async () => {
  let writes = 0;
  const outcome = await burst({
    params: { cowStallTimeoutMs: 30 },
    storageHooks: {
      async before(request) {
        if (request.kind === "write" && ++writes > 10) {
          await new Promise((resolve) => setTimeout(resolve, 1000));
        }
      },
    },
  });
  assertEquals(outcome.errorCode, -5);
  assertEquals(outcome.events.map((event) => event.code), ["corrupted"]);
  assertTrue(outcome.slowestWriteMs < 500, `a write took ${outcome.slowestWriteMs.toFixed(0)} ms`);
});

Deno.test("A growth that hangs past cow_stall_timeout_ms: corrupted with -ENOSPC, writes wait no longer", async () => {
  let allocations = 0;
  const outcome = await burst({
    params: { cowStallTimeoutMs: 30 },
    storageHooks: {
      async before(request) {
        if (request.kind === "allocate" && ++allocations > 1) {
          await new Promise((resolve) => setTimeout(resolve, 1000));
        }
      },
    },
  });
  assertEquals(outcome.errorCode, -28);
  assertEquals(outcome.events.map((event) => event.code), ["no_space", "corrupted"]);
  assertTrue(outcome.slowestWriteMs < 500, `a write took ${outcome.slowestWriteMs.toFixed(0)} ms`);
});

Deno.test("Destroy with writes and image I/O in flight: every write completes, image I/O ends", async () => {
  const outcome = await burst({ destroyAtWave: 20 });
  assertEquals(outcome.errorCode, 0);
});

Deno.test("Destroy with I/O in flight on a failing storage: every write completes", async () => {
  let writes = 0;
  await burst({
    destroyAtWave: 12,
    imageWritesMayFail: true,
    storageHooks: {
      before(request) {
        if (request.kind === "write" && ++writes > 20) throw new BlksnapError("EIO", "injected");
      },
    },
  });
});
