import { deepStrictEqual as assertEquals, match as assertMatch } from "node:assert/strict";
import { directIoRefusal } from "./storage.ts";

const dev = (logicalBlockSize: number, chunkBytes = 256 << 10) => ({
  path: `/dev/loop-${logicalBlockSize}`,
  logicalBlockSize,
  chunkBytes,
});

Deno.test("direct I/O to a block-device storage: only where its logical block divides every request", () => {
  // 512-byte storage: everything fits (units of one sector, or of 4 KiB).
  assertEquals(directIoRefusal(512, 512, [dev(512)]), null);
  assertEquals(directIoRefusal(512, 4096, [dev(512), dev(4096)]), null);
  // 4 KiB storage: 4 KiB units and 4 KiB devices only.
  assertEquals(directIoRefusal(4096, 4096, [dev(4096), dev(4096)]), null);
  assertMatch(
    directIoRefusal(4096, 4096, [dev(4096), dev(512)])!,
    /larger than \/dev\/loop-512's \(512\)/,
  );
  assertMatch(directIoRefusal(4096, 512, [dev(4096)])!, /allocation unit 512/);
  // a chunk smaller than the storage's block
  assertMatch(directIoRefusal(4096, 4096, [dev(4096, 2048)])!, /larger than/);
  // nonsense from the ioctl
  assertMatch(directIoRefusal(0, 4096, [dev(512)])!, /power of two/);
  assertMatch(directIoRefusal(1536, 4096, [dev(512)])!, /power of two/);
  // no device yet (a take needs one, but the rule holds)
  assertEquals(directIoRefusal(4096, 4096, []), null);
});
