/**
 * Model-based test of the engine: thousands of random operations — writes
 * and discards to the tracked devices, image reads and writes, CBT marks,
 * takes and destroys — issued concurrently over file-backed devices, checked
 * after every batch against a reference model made of plain byte arrays.
 *
 * Everything really is in flight at once: the devices do their I/O in
 * pieces with random delays before and after each, so overlapping reads and
 * writes interleave; takes and destroys run in the middle of the batches;
 * and some snapshots get a faulty difference storage (EIO on reads or
 * writes, a small limit, growths that stall past `cow_stall_timeout_ms`).
 * Whatever happens, a write to the original never fails and the original
 * holds exactly what was written; the CBT maps match the model; an image
 * that is not corrupted holds exactly the original at take time (plus the
 * image writes); a snapshot without faults is never corrupted.
 *
 * A fixed set of regression seeds always runs, then a random one. Run with
 * BLKSNAP_SEED=n to replay one seed only; BLKSNAP_MODEL_STEPS=n to run longer.
 */

import {
  BlksnapError,
  type DiffArea,
  FileDevice,
  makeParams,
  openDiffStorageFile,
  SECTOR_SIZE,
  Snapshots,
  Tracker,
} from "../../lib/engine/mod.ts";
import { firstDifference, Rng, tempDir } from "../../lib/engine/_test_util.ts";

const DEVICES = 2;
const DEVICE_BYTES = 256 * 1024;
const DEVICE_SECTORS = DEVICE_BYTES / SECTOR_SIZE;
const CHUNK_SECTORS = 8; // 4 KiB chunks
const BLOCK_SECTORS = 16; // 8 KiB tracking blocks
const BLOCKS = DEVICE_SECTORS / BLOCK_SECTORS;
const STALL_TIMEOUT_MS = 100;
/**
 * Seeds that always run: 1 and 42 meet every fault; 2044237749 caught an
 * image read racing a destroy that failed with EIO rather than ENODEV. A
 * seed fixes every choice; interleavings that hang on timers may still vary.
 */
const REGRESSION_SEEDS = [1, 42, 2044237749];
const REGRESSION_STEPS = 400;
const RANDOM_STEPS = Number(Deno.env.get("BLKSNAP_MODEL_STEPS") ?? 800);

const params = makeParams({
  trackingBlockMinimumShift: 13,
  chunkMinimumShift: 12,
  freeDiffBufferPoolSize: 4,
  chunkMaximumInQueue: 3,
  diffStorageMinimumSectors: 64,
  cowStallTimeoutMs: STALL_TIMEOUT_MS,
});

/** What is wrong with a snapshot's difference storage. */
type Fault = "none" | "read-eio" | "write-eio" | "small-limit" | "stalled-growth";

interface CbtModel {
  write: Uint8Array;
  read: Uint8Array;
  active: number;
  previous: number;
}

/** The expected content of one device's image of one snapshot. */
interface ImageModel {
  readonly device: number;
  readonly bytes: Uint8Array;
  readonly fault: Fault;
  /** A failed image write left part of it unknown. */
  unknown: boolean;
}

interface SnapshotModel {
  id: string;
  devices: number[];
  fault: Fault;
}

/** One operation of a batch. */
interface Op {
  describe: string;
  run: () => Promise<void>;
}

class Model {
  readonly original: Uint8Array[] = [];
  readonly cbt: CbtModel[] = [];
  readonly snapshots: SnapshotModel[] = [];
  /** Images by the diff area that serves them, made at the instant of the switch. */
  readonly images = new Map<DiffArea, ImageModel>();

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

  /** `cbt_map_switch`, wrap included. */
  take(d: number): void {
    const cbt = this.cbt[d]!;
    cbt.previous = cbt.active;
    if (cbt.active === 255) {
      cbt.active = 1;
      cbt.write.fill(0);
    } else {
      cbt.read.set(cbt.write);
      cbt.active++;
    }
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

function modelTest(seed: number, steps: number, what: string): void {
  Deno.test({
    name: `The engine matches a reference model under concurrent operations and faults (${what})`,
    sanitizeOps: true,
    sanitizeResources: true,
    async fn() {
      const rng = new Rng(seed);
      const log: string[] = [];
      let step = 0;
      try {
        await run(rng, steps, log, (n) => step = n);
      } catch (error) {
        console.error(`Model test failed: BLKSNAP_SEED=${seed} step=${step}`);
        console.error(`Last operations:\n  ${log.slice(-25).join("\n  ")}`);
        throw error;
      }
    },
  });
}

const replay = Deno.env.get("BLKSNAP_SEED");
if (replay !== undefined && replay !== "") {
  modelTest(Number(replay) >>> 0, RANDOM_STEPS, `BLKSNAP_SEED=${Number(replay) >>> 0}`);
} else {
  for (const seed of REGRESSION_SEEDS) modelTest(seed, REGRESSION_STEPS, `seed ${seed}`);
  const seed = crypto.getRandomValues(new Uint32Array(1))[0]!;
  modelTest(seed, RANDOM_STEPS, `random seed ${seed}`);
}

async function run(
  rng: Rng,
  steps: number,
  log: string[],
  setStep: (n: number) => void,
): Promise<void> {
  await using dir = await tempDir();
  let delays = true;
  let faults = true;
  /** A few microtasks, now and then a turn of the event loop (`turns` of the time). */
  const delayBy = async (turns: number) => {
    if (!delays) return;
    const microtasks = rng.int(4);
    for (let i = 0; i < microtasks; i++) await Promise.resolve();
    if (rng.chance(turns)) await new Promise((resolve) => setTimeout(resolve, 0));
  };
  const delay = () => delayBy(0.2);
  // around every piece of device I/O: mostly microtasks, so that pieces interleave finely
  const pieceDelay = () => delayBy(0.03);
  const model = new Model();
  const devices: FileDevice[] = [];
  const trackers: Tracker[] = [];
  /** The fault of the snapshot being created or taken (control operations are serialised). */
  let nextFault: Fault = "none";
  for (let d = 0; d < DEVICES; d++) {
    const device = await FileDevice.open({
      path: `${dir.path}/dev${d}.img`,
      sizeBytes: DEVICE_BYTES,
      deviceId: `7:${d}`,
      pieceSectors: rng.range(1, 4),
      hooks: { before: pieceDelay, after: pieceDelay },
    });
    devices.push(device);
    const tracker = new Tracker({ device, params });
    // the instant of the switch: the model takes too, and freezes the image
    const takeSnapshot = tracker.takeSnapshot.bind(tracker);
    tracker.takeSnapshot = (area: DiffArea) => {
      takeSnapshot(area);
      model.take(d);
      model.images.set(area, {
        device: d,
        bytes: model.original[d]!.slice(),
        fault: nextFault,
        unknown: false,
      });
    };
    trackers.push(tracker);
  }
  const snapshots = new Snapshots({
    params,
    opener: (path) => {
      const fault = nextFault;
      return openDiffStorageFile(path, {
        hooks: {
          async before(request) {
            await delay();
            if (!faults) return;
            if (fault === "read-eio" && request.kind === "read" && rng.chance(0.3)) {
              throw new BlksnapError("EIO", "injected read EIO");
            }
            if (fault === "write-eio" && request.kind === "write" && rng.chance(0.1)) {
              throw new BlksnapError("EIO", "injected write EIO");
            }
            if (fault === "stalled-growth" && request.kind === "allocate" && rng.chance(0.5)) {
              // a growth that makes no progress for longer than the watchdog allows
              await new Promise((resolve) => setTimeout(resolve, STALL_TIMEOUT_MS * 2.5));
            }
          },
        },
      });
    },
  });
  const stats = {
    ops: 0,
    batches: 0,
    takes: 0,
    destroys: 0,
    controlsInBatches: 0,
    imageReads: 0,
    imageErrors: 0,
    corrupted: 0,
    rereads: 0,
  };

  async function check(): Promise<void> {
    delays = false;
    faults = false;
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
        const area = trackers[d]!.diffArea;
        if (area === null) continue;
        const image = model.images.get(area)!;
        if (area.isCorrupted) {
          if (image.fault === "none") {
            throw new Error(
              `A snapshot without faults of device ${d} is corrupted: ${area.errorCode}`,
            );
          }
          await expectErrno(trackers[d]!.readImage(0, new Uint8Array(512)), ["EIO"], "image");
          continue;
        }
        if (image.unknown) continue;
        const out = new Uint8Array(DEVICE_BYTES);
        try {
          await trackers[d]!.readImage(0, out);
        } catch (err) {
          // A faulty storage may fail late (a stalled growth's watchdog, a
          // write still in flight): corrupted during the read is allowed for
          // it, and only for it.
          if (image.fault !== "none" && area.isCorrupted && err instanceof BlksnapError) continue;
          throw err;
        }
        expectBytes(out, image.bytes, `image of device ${d}`);
      }
    } finally {
      delays = true;
      faults = true;
    }
  }

  function randomRange(maxSectors: number): [number, number] {
    // mostly small and unaligned, sometimes a few chunks
    const count = rng.chance(0.7) ? rng.range(1, CHUNK_SECTORS) : rng.range(1, maxSectors);
    const sector = rng.int(DEVICE_SECTORS - count + 1);
    return [sector, count];
  }

  /** A write-like request the way the tracked device's target does it. */
  async function writeLike(
    d: number,
    sector: number,
    count: number,
    data: Uint8Array | null,
  ): Promise<void> {
    const tracker = trackers[d]!;
    await tracker.beforeWrite(sector, count);
    try {
      // admitted: no switch can happen before endWrite(), so the model marks
      // with the same number the tracker just did, and a take sees this data
      model.mark(d, sector, count, false);
      if (data === null) {
        await devices[d]!.discard(sector, count);
        model.original[d]!.fill(0, sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
      } else {
        await devices[d]!.write(sector, data);
        model.original[d]!.set(data, sector * SECTOR_SIZE);
      }
    } finally {
      tracker.endWrite();
    }
  }

  function pickOp(busy: Busy): Op | null {
    const d = rng.int(DEVICES);
    const tracker = trackers[d]!;
    const kind = rng.next();
    if (kind < 0.4) {
      const [sector, count] = randomRange(4 * CHUNK_SECTORS);
      if (!busy.claim(`orig${d}`, sector, count)) return null;
      const data = rng.bytes(count * SECTOR_SIZE);
      return {
        describe: `write dev${d} ${sector}+${count}`,
        run: () => writeLike(d, sector, count, data),
      };
    }
    if (kind < 0.45) {
      const [sector, count] = randomRange(4 * CHUNK_SECTORS);
      if (!busy.claim(`orig${d}`, sector, count)) return null;
      return {
        describe: `discard dev${d} ${sector}+${count}`,
        run: () => writeLike(d, sector, count, null),
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
    if (kind < 0.8) {
      const [sector, count] = randomRange(6 * CHUNK_SECTORS);
      if (!busy.claim(`image${d}`, sector, count)) return null;
      return {
        describe: `readImage dev${d} ${sector}+${count}`,
        run: async () => {
          // the snapshot is whichever is taken when the read starts
          const area = tracker.diffArea;
          if (area === null) return;
          const image = model.images.get(area)!;
          const expected = image.bytes.slice(sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE);
          const unknown = image.unknown;
          const out = new Uint8Array(count * SECTOR_SIZE);
          try {
            await tracker.readImage(sector, out);
          } catch (error) {
            expectImageError(error, area, image.fault, "read");
            stats.imageErrors++;
            // the caller reuses its buffer: nothing of the failed read may write into it
            out.fill(0xa5);
            failedReads.push(out);
            return;
          }
          if (!unknown && !image.unknown) {
            expectBytes(out, expected, `image read dev${d} ${sector}+${count}`);
          }
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
        const area = tracker.diffArea;
        if (area === null) return;
        const image = model.images.get(area)!;
        // both maps are marked at once, unless the snapshot is corrupted
        const marks = !area.isCorrupted;
        const writing = tracker.writeImage(sector, data);
        if (marks) model.mark(d, sector, count, true);
        try {
          await writing;
        } catch (error) {
          expectImageError(error, area, image.fault, "write");
          image.unknown = true;
          stats.imageErrors++;
          return;
        }
        image.bytes.set(data, sector * SECTOR_SIZE);
      },
    };
  }

  /** An image error is allowed only when the snapshot is gone, corrupted, or its storage faulty. */
  function expectImageError(
    error: unknown,
    area: DiffArea,
    fault: Fault,
    what: "read" | "write",
  ): void {
    if (!(error instanceof BlksnapError)) throw error;
    if (error.code === "ENODEV" && area.isClosed) return;
    if (error.code === "EIO" && area.isCorrupted) return;
    if (error.code === "EIO" && fault === `${what}-eio`) return;
    throw error;
  }

  let control: Promise<void> = Promise.resolve();
  /** Buffers of image reads that failed, filled with 0xa5 once they did. */
  const failedReads: Uint8Array[] = [];

  /** A take or a destroy, after the one before it (the model decides when it runs). */
  function controlOp(): Op {
    return {
      describe: "control",
      run: () => {
        const previous = control;
        control = (async () => {
          await previous;
          await delay();
          await takeOrDestroy();
        })();
        return control;
      },
    };
  }

  async function takeOrDestroy(): Promise<void> {
    const free = [...Array(DEVICES).keys()].filter((d) => model.snapshotOf(d) === undefined);
    if (model.snapshots.length > 0 && (free.length === 0 || rng.chance(0.4))) {
      const snapshot = rng.pick(model.snapshots);
      log.push(`destroy ${snapshot.devices.join(",")} (${snapshot.fault})`);
      const areas = snapshot.devices.map((d) => trackers[d]!.diffArea!);
      model.snapshots.splice(model.snapshots.indexOf(snapshot), 1);
      await snapshots.destroy(snapshot.id);
      for (const area of areas) {
        stats.rereads += area.stats.rereads;
        if (area.isCorrupted) stats.corrupted++;
        model.images.delete(area); // no operation can start on it any more
      }
      stats.destroys++;
      return;
    }
    if (free.length === 0) return;
    const chosen = rng.shuffle(free).slice(0, rng.range(1, free.length));
    const fault = rng.chance(0.7)
      ? "none"
      : rng.pick(["read-eio", "write-eio", "small-limit", "stalled-growth"] as const);
    log.push(`take ${chosen.join(",")} (${fault})`);
    nextFault = fault;
    const id = await snapshots.create({
      diffStoragePath: dir.path,
      limitSectors: fault === "small-limit" ? 6 * CHUNK_SECTORS : 4096,
    });
    for (const d of chosen) await snapshots.addDevice(id, trackers[d]!);
    model.snapshots.push({ id, devices: chosen, fault });
    await snapshots.take(id);
    stats.takes++;
  }

  for (let d = 0; d < DEVICES; d++) {
    const data = rng.bytes(DEVICE_BYTES);
    await writeLike(d, 0, DEVICE_SECTORS, data);
  }
  await check();

  for (let n = 0; n < steps; n++) {
    setStep(n);
    if (rng.chance(0.03)) {
      await controlOp().run();
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
    // takes and destroys in the middle of the I/O
    if (rng.chance(0.06)) {
      ops.splice(rng.int(ops.length + 1), 0, controlOp());
      stats.controlsInBatches++;
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
    for (const buf of failedReads.splice(0)) {
      if (buf.some((b) => b !== 0xa5)) throw new Error("A failed image read wrote into its buffer");
    }
  }
  for (const snapshot of model.snapshots) {
    for (const d of snapshot.devices) stats.rereads += trackers[d]!.diffArea?.stats.rereads ?? 0;
  }
  await snapshots.destroyAll();
  for (const device of devices) device.close();
  console.log(`model: ${JSON.stringify(stats)}`);
  if (stats.ops < steps * 2) throw new Error(`Only ${stats.ops} operations ran`);
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

async function expectErrno(
  promise: Promise<unknown>,
  codes: readonly string[],
  what: string,
): Promise<void> {
  try {
    await promise;
  } catch (error) {
    if (error instanceof BlksnapError && codes.includes(error.code)) return;
    throw error;
  }
  throw new Error(`${what}: expected ${codes.join(" or ")}, but it succeeded`);
}
