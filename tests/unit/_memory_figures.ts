/**
 * Measures the engine's memory for a 1 TiB device: with nothing written
 * after the take, and with 1% of its chunks copied (one sector written in
 * each of 1% of the chunks, chosen at random, which is the worst case for
 * the chunk table's locality).
 *
 * The device is a {@linkcode NullDevice} (zeros, writes dropped) and the
 * difference storage drops its data, so only the engine's own memory is
 * measured: the bytes of the SharedArrayBuffers it allocated (CBT maps,
 * chunk table, buffer pool), and the JS heap and RSS deltas.
 *
 *     deno run --v8-flags=--expose-gc tests/unit/_memory_figures.ts
 *
 * @module
 */

import { DEFAULT_PARAMS } from "../../lib/engine/params.ts";
import { Snapshots } from "../../lib/engine/snapshot.ts";
import { Tracker } from "../../lib/engine/tracker.ts";
import { MemoryDiffStorageFile, NullDevice, Rng } from "../../lib/engine/_test_util.ts";

/** One measurement. */
export interface MemoryFigure {
  /** CBT maps: header, write map and read map. */
  readonly cbtBytes: number;
  /** The chunk state table. */
  readonly chunkTableBytes: number;
  /** The buffer pool: buffers made so far and their free stack. */
  readonly bufferPoolBytes: number;
  /** Sum of the engine's SharedArrayBuffers. */
  readonly sharedBytes: number;
  /** Records in the chunk table. */
  readonly chunkRecords: number;
  /** JS heap growth since before the tracker was made (after a GC when exposed). */
  readonly heapDeltaBytes: number;
  /** RSS growth since before the tracker was made (committed pages only). */
  readonly rssDeltaBytes: number;
}

/** Both figures, for a device of `deviceBytes`. */
export interface MemoryFigures {
  readonly deviceBytes: number;
  readonly chunkCount: number;
  readonly chunksCopied: number;
  readonly nothingWritten: MemoryFigure;
  readonly onePercentCopied: MemoryFigure;
}

function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
}

/** Runs the measurement; `fraction` of the chunks are copied (default 1%). */
export async function measureMemory(
  deviceBytes = 2 ** 40,
  fraction = 0.01,
  seed = 1,
): Promise<MemoryFigures> {
  collectGarbage();
  const before = Deno.memoryUsage();
  const params = DEFAULT_PARAMS;
  const device = new NullDevice(deviceBytes, "null:0");
  const tracker = new Tracker({ device, params });
  const snapshots = new Snapshots({
    params,
    opener: () => Promise.resolve(new MemoryDiffStorageFile({ keepData: false, deviceId: "0:0" })),
  });
  const id = await snapshots.create({ diffStoragePath: "null", limitSectors: deviceBytes / 512 });
  await snapshots.addDevice(id, tracker);
  await snapshots.take(id);
  const area = tracker.diffArea!;

  const figure = (): MemoryFigure => {
    collectGarbage();
    const now = Deno.memoryUsage();
    const cbtBytes = tracker.cbtMap.byteLength;
    const chunkTableBytes = area.chunks.byteLength;
    const bufferPoolBytes = area.buffers.byteLength;
    return {
      cbtBytes,
      chunkTableBytes,
      bufferPoolBytes,
      sharedBytes: cbtBytes + chunkTableBytes + bufferPoolBytes,
      chunkRecords: area.chunks.size,
      heapDeltaBytes: now.heapUsed - before.heapUsed,
      rssDeltaBytes: now.rss - before.rss,
    };
  };
  const nothingWritten = figure();

  const { chunkCount, chunkSectors } = area.geometry;
  const chunksCopied = Math.round(chunkCount * fraction);
  const rng = new Rng(seed);
  const chosen = new Set<number>();
  while (chosen.size < chunksCopied) chosen.add(rng.int(chunkCount));
  const sector = new Uint8Array(512);
  const pending: Promise<void>[] = [];
  for (const n of chosen) {
    pending.push(tracker.write(n * chunkSectors + rng.int(chunkSectors), sector));
    if (pending.length === 64) await Promise.all(pending.splice(0));
  }
  await Promise.all(pending);
  await area.settled();
  if (area.chunks.size !== chunksCopied || area.isCorrupted) {
    throw new Error(`Expected ${chunksCopied} chunks copied, got ${area.chunks.size}`);
  }
  chosen.clear(); // the harness's own memory, not the engine's
  const onePercentCopied = figure();
  await snapshots.destroy(id);
  return { deviceBytes, chunkCount, chunksCopied, nothingWritten, onePercentCopied };
}

function mib(bytes: number): string {
  return `${bytes} B = ${(bytes / 2 ** 20).toFixed(2)} MiB`;
}

/** Formats the figures as a small table. */
export function formatFigures(figures: MemoryFigures): string {
  const rows: [string, (f: MemoryFigure) => string][] = [
    ["CBT maps (SAB)", (f) => mib(f.cbtBytes)],
    ["chunk table (SAB)", (f) => mib(f.chunkTableBytes)],
    ["chunk records", (f) => `${f.chunkRecords}`],
    ["buffer pool (SAB)", (f) => mib(f.bufferPoolBytes)],
    ["all SABs", (f) => mib(f.sharedBytes)],
    ["JS heap delta", (f) => mib(f.heapDeltaBytes)],
    ["RSS delta", (f) => mib(f.rssDeltaBytes)],
  ];
  const lines = [
    `device ${figures.deviceBytes / 2 ** 40} TiB, ${figures.chunkCount} chunks, ` +
    `${figures.chunksCopied} copied`,
    `${"".padEnd(20)}${"nothing written".padEnd(32)}1% of chunks copied`,
  ];
  for (const [name, value] of rows) {
    lines.push(
      `${name.padEnd(20)}${value(figures.nothingWritten).padEnd(32)}${
        value(figures.onePercentCopied)
      }`,
    );
  }
  return lines.join("\n");
}

if (import.meta.main) {
  const start = performance.now();
  const figures = await measureMemory();
  console.log(formatFigures(figures));
  console.log(`(${((performance.now() - start) / 1000).toFixed(1)} s)`);
}
