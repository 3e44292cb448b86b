/**
 * The engine's memory for a 1 TiB device, measured (see
 * tests/unit/_memory_figures.ts): it grows with what was written, not with
 * the size of the device.
 */

import { formatFigures, measureMemory } from "./_memory_figures.ts";
import { assertEquals, assertTrue } from "../../lib/engine/_assert.ts";

const MiB = 2 ** 20;

Deno.test("Engine memory for a 1 TiB device grows with the chunks copied, not the device", async () => {
  const figures = await measureMemory();
  console.log(formatFigures(figures));
  const { nothingWritten: idle, onePercentCopied: busy } = figures;
  assertEquals(figures.chunkCount, 4194304);
  assertEquals(busy.chunkRecords, 41943);
  // CBT: 2 Mi blocks of 512 KiB, two maps
  assertEquals(idle.cbtBytes, 64 + 2 * 2 * MiB);
  assertTrue(idle.chunkTableBytes <= 4096, `idle chunk table ${idle.chunkTableBytes}`);
  assertTrue(idle.bufferPoolBytes <= 4096, `idle pool ${idle.bufferPoolBytes}`);
  // at most 2 slots of 32 bytes per record, rounded to a power of 2
  assertTrue(busy.chunkTableBytes <= 64 + 2 ** 17 * 32, `chunk table ${busy.chunkTableBytes}`);
  // buffers never exceed the pool: 128 chunks of 256 KiB
  assertTrue(busy.bufferPoolBytes <= 128 * 256 * 1024 + 4096, `pool ${busy.bufferPoolBytes}`);
});
