/**
 * Model-based test of the engine: thousands of random operations — writes
 * and discards to the tracked devices, image reads and writes, CBT marks,
 * takes and destroys — issued concurrently over file-backed devices whose
 * I/O is delayed at random, checked after every batch against a reference
 * model made of plain byte arrays.
 *
 * Run with BLKSNAP_SEED=n to replay a failure; BLKSNAP_MODEL_STEPS=n to run longer.
 */

import {
  FileDevice,
  makeParams,
  openDiffStorageFile,
  SECTOR_SIZE,
  Snapshots,
  Tracker,
} from "../../lib/engine/mod.ts";
import { firstDifference, Rng, seedFromEnv, tempDir } from "../../lib/engine/_test_util.ts";

const DEVICES = 2;
const DEVICE_BYTES = 256 * 1024;
const DEVICE_SECTORS = DEVICE_BYTES / SECTOR_SIZE;
const CHUNK_SECTORS = 8; // 4 KiB chunks
const BLOCK_SECTORS = 16; // 8 KiB tracking blocks
const BLOCKS = DEVICE_SECTORS / BLOCK_SECTORS;
const STEPS = Number(Deno.env.get("BLKSNAP_MODEL_STEPS") ?? 1200);

const params = makeParams({
  trackingBlockMinimumShift: 13,
  chunkMinimumShift: 12,
  freeDiffBufferPoolSize: 4,
  chunkMaximumInQueue: 3,
  diffStorageMinimumSectors: 64,
});

interface CbtModel {
  write: Uint8Array;
  read: Uint8Array;
  active: number;
  previous: number;
}

interface SnapshotModel {
  id: string;
  devices: number[];
  images: Map<number, Uint8Array>;
}

/** One operation of a batch, with what it may not overlap. */
interface Op {
  describe: string;
  run: () => Promise<void>;
}

class Model {
  readonly original: Uint8Array[] = [];
  readonly cbt: CbtModel[] = [];
  readonly snapshots: SnapshotModel[] = [];

  constructor() {
    for (let d = 0; d < DEVICES; d++) {
      this.original.push(new Uint8Array(DEVICE_BYTES));
      this.cbt.push({
        write: new Uint8Array(BLOCKS),
        read: new Uint8Array(BLOCKS),
        active: 1,
        previous: 0,
      });
    }
  }

  snapshotOf(d: number): SnapshotModel | undefined {
    return this.snapshots.find((s) => s.devices.includes(d));
  }

  mark(d: number, sector: number, count: number, both: boolean): void {
    const cbt = this.cbt[d]!;
    const first = Math.floor(sector / BLOCK_SECTORS);
    const last = Math.floor((sector + count - 1) / BLOCK_SECTORS);
    for (let b = first; b <= last; b++) {
      cbt.write[b] = Math.max(cbt.write[b]!, cbt.active);
      if (both) cbt.read[b] = Math.max(cbt.read[b]!, cbt.previous);
    }
  }

  take(d: number): void {
    const cbt = this.cbt[d]!;
    cbt.read.set(cbt.write);
    cbt.previous = cbt.active;
    cbt.active++;
  }
}

/** Sector ranges in use by the operations of one batch. */
class Busy {
  readonly #ranges = new Map<string, [number, number][]>();

  /** Claims `[sector, sector + count)` under `key` unless it overlaps a claim. */
  claim(key: string, sector: number, count: number): boolean {
    const ranges = this.#ranges.get(key) ?? [];
    for (const [s, c] of ranges) if (sector < s + c && s < sector + count) return false;
    ranges.push([sector, count]);
    this.#ranges.set(key, ranges);
    return true;
  }
}

Deno.test({
  name: "The engine matches a reference model under random concurrent operations",
  sanitizeOps: true,
  sanitizeResources: true,
  async fn() {
    const seed = seedFromEnv();
    const rng = new Rng(seed);
    const log: string[] = [];
    let step = 0;
    try {
      await run(rng, log, (n) => step = n);
    } catch (error) {
      console.error(`Model test failed: BLKSNAP_SEED=${seed} step=${step}`);
      console.error(`Last operations:\n  ${log.slice(-25).join("\n  ")}`);
      throw error;
    }
  },
});

async function run(rng: Rng, log: string[], setStep: (n: number) => void): Promise<void> {
  await using dir = await tempDir();
  let delays = true;
  const delay = async () => {
    if (!delays) return;
    const microtasks = rng.int(4);
    for (let i = 0; i < microtasks; i++) await Promise.resolve();
    if (rng.chance(0.25)) await new Promise((resolve) => setTimeout(resolve, 0));
  };
  const devices: FileDevice[] = [];
  const trackers: Tracker[] = [];
  for (let d = 0; d < DEVICES; d++) {
    const device = await FileDevice.open({
      path: `${dir.path}/dev${d}.img`,
      sizeBytes: DEVICE_BYTES,
      deviceId: `7:${d}`,
      hooks: { before: delay },
    });
    devices.push(device);
    trackers.push(new Tracker({ device, params }));
  }
  const snapshots = new Snapshots({
    params,
    opener: (path) => openDiffStorageFile(path, { hooks: { before: delay } }),
  });
  const model = new Model();
  const stats = { ops: 0, batches: 0, takes: 0, destroys: 0, imageReads: 0, rereads: 0 };

  async function check(): Promise<void> {
    delays = false;
    try {
      for (let d = 0; d < DEVICES; d++) {
        const onDisk = new Uint8Array(DEVICE_BYTES);
        devices[d]!.readSync(0, onDisk);
        expectBytes(onDisk, model.original[d]!, `original ${d}`);
        const cbt = model.cbt[d]!;
        const map = trackers[d]!.cbtMap;
        expectEqual(map.snapNumberActive, cbt.active, `CBT active ${d}`);
        expectEqual(map.snapNumberPrevious, cbt.previous, `CBT previous ${d}`);
        expectBytes(map.writeMap, cbt.write, `CBT write map ${d}`);
        expectBytes(map.readMap, cbt.read, `CBT read map ${d}`);
      }
      for (const snapshot of model.snapshots) {
        for (const [d, image] of snapshot.images) {
          const out = new Uint8Array(DEVICE_BYTES);
          await trackers[d]!.readImage(0, out);
          expectBytes(out, image, `image of device ${d}`);
        }
      }
    } finally {
      delays = true;
    }
  }

  function randomRange(maxSectors: number): [number, number] {
    // mostly small and unaligned, sometimes a few chunks
    const count = rng.chance(0.7) ? rng.range(1, CHUNK_SECTORS) : rng.range(1, maxSectors);
    const sector = rng.int(DEVICE_SECTORS - count + 1);
    return [sector, count];
  }

  function pickOp(busy: Busy): Op | null {
    const d = rng.int(DEVICES);
    const tracker = trackers[d]!;
    const snapshot = model.snapshotOf(d);
    const image = snapshot?.images.get(d);
    const kind = rng.next();
    if (kind < 0.4) {
      const [sector, count] = randomRange(4 * CHUNK_SECTORS);
      if (!busy.claim(`orig${d}`, sector, count)) return null;
      const data = rng.bytes(count * SECTOR_SIZE);
      return {
        describe: `write dev${d} ${sector}+${count}`,
        run: async () => {
          await tracker.write(sector, data);
          model.original[d]!.set(data, sector * SECTOR_SIZE);
          model.mark(d, sector, count, false);
        },
      };
    }
    if (kind < 0.45) {
      const [sector, count] = randomRange(4 * CHUNK_SECTORS);
      if (!busy.claim(`orig${d}`, sector, count)) return null;
      return {
        describe: `discard dev${d} ${sector}+${count}`,
        run: async () => {
          await tracker.discard(sector, count);
          model.original[d]!.fill(0, sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
          model.mark(d, sector, count, false);
        },
      };
    }
    if (kind < 0.5) {
      const [sector, count] = randomRange(64);
      return {
        describe: `markDirty dev${d} ${sector}+${count}`,
        run: () => {
          tracker.markDirty([{ sector, count }]);
          model.mark(d, sector, count, true);
          return Promise.resolve();
        },
      };
    }
    if (image === undefined) return null;
    if (kind < 0.8) {
      const [sector, count] = randomRange(6 * CHUNK_SECTORS);
      if (!busy.claim(`image${d}`, sector, count)) return null;
      const expected = image.slice(sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
      return {
        describe: `readImage dev${d} ${sector}+${count}`,
        run: async () => {
          const out = new Uint8Array(count * SECTOR_SIZE);
          await tracker.readImage(sector, out);
          expectBytes(out, expected, `image read dev${d} ${sector}+${count}`);
          stats.imageReads++;
        },
      };
    }
    const [sector, count] = randomRange(3 * CHUNK_SECTORS);
    if (!busy.claim(`image${d}`, sector, count)) return null;
    const data = rng.bytes(count * SECTOR_SIZE);
    return {
      describe: `writeImage dev${d} ${sector}+${count}`,
      run: async () => {
        await tracker.writeImage(sector, data);
        image.set(data, sector * SECTOR_SIZE);
        model.mark(d, sector, count, true);
      },
    };
  }

  async function control(): Promise<void> {
    const free = [...Array(DEVICES).keys()].filter((d) => model.snapshotOf(d) === undefined);
    if (model.snapshots.length > 0 && (free.length === 0 || rng.chance(0.4))) {
      const snapshot = rng.pick(model.snapshots);
      log.push(`destroy ${snapshot.devices.join(",")}`);
      for (const d of snapshot.devices) {
        stats.rereads += trackers[d]!.diffArea?.stats.rereads ?? 0;
      }
      await snapshots.destroy(snapshot.id);
      model.snapshots.splice(model.snapshots.indexOf(snapshot), 1);
      stats.destroys++;
      return;
    }
    if (free.length === 0) return;
    const chosen = rng.shuffle(free).slice(0, rng.range(1, free.length));
    log.push(`take ${chosen.join(",")}`);
    const id = await snapshots.create({ diffStoragePath: dir.path, limitSectors: 4096 });
    for (const d of chosen) await snapshots.addDevice(id, trackers[d]!);
    await snapshots.take(id);
    const images = new Map<number, Uint8Array>();
    for (const d of chosen) {
      images.set(d, model.original[d]!.slice());
      model.take(d);
    }
    model.snapshots.push({ id, devices: chosen, images });
    stats.takes++;
  }

  for (let d = 0; d < DEVICES; d++) {
    const data = rng.bytes(DEVICE_BYTES);
    await trackers[d]!.write(0, data);
    model.original[d]!.set(data);
    model.mark(d, 0, DEVICE_SECTORS, false);
  }
  await check();

  for (let n = 0; n < STEPS; n++) {
    setStep(n);
    if (rng.chance(0.05)) {
      await control();
      await check();
      continue;
    }
    const busy = new Busy();
    const ops: Op[] = [];
    const size = rng.range(1, 8);
    for (let tries = 0; ops.length < size && tries < size * 3; tries++) {
      const op = pickOp(busy);
      if (op !== null) ops.push(op);
    }
    log.push(`batch ${n}: ${ops.map((op) => op.describe).join("; ")}`);
    // every op starts after a random delay; all run concurrently
    const running = ops.map(async (op) => {
      await delay();
      await op.run();
    });
    const results = await Promise.allSettled(rng.shuffle(running));
    for (const result of results) {
      if (result.status === "rejected") throw result.reason;
    }
    stats.ops += ops.length;
    stats.batches++;
    await check();
  }
  for (const snapshot of model.snapshots) {
    for (const d of snapshot.devices) stats.rereads += trackers[d]!.diffArea?.stats.rereads ?? 0;
  }
  await snapshots.destroyAll();
  for (const device of devices) device.close();
  console.log(`model: ${JSON.stringify(stats)}`);
  if (stats.ops < 1000 && STEPS >= 1000) throw new Error(`Only ${stats.ops} operations ran`);
}

function expectEqual(actual: number, expected: number, what: string): void {
  if (actual !== expected) throw new Error(`${what}: ${actual}, expected ${expected}`);
}

function expectBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const at = firstDifference(actual, expected);
  if (at >= 0) {
    throw new Error(
      `${what} differs at byte ${at} (sector ${Math.floor(at / SECTOR_SIZE)}): ${actual[at]} != ${
        expected[at]
      }`,
    );
  }
}
