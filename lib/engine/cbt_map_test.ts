import { assertEquals, assertErrno, assertNotEquals, assertTrue } from "./_assert.ts";
import { cbtGeometry, CbtMap, uuidFromBytes, uuidToBytes } from "./cbt_map.ts";
import { DEFAULT_PARAMS, makeParams } from "./params.ts";

const TiB = 2 ** 40;
const params = makeParams({ trackingBlockMinimumShift: 12 }); // 4 KiB blocks: 8 sectors

Deno.test("cbtGeometry() starts at 64 KiB blocks for small devices", () => {
  assertEquals(cbtGeometry(2 ** 20 / 512, DEFAULT_PARAMS), { blockSizeShift: 16, blockCount: 16 });
  // a partial last block still counts
  assertEquals(cbtGeometry(129, DEFAULT_PARAMS), { blockSizeShift: 16, blockCount: 2 });
});

Deno.test("cbtGeometry() grows the block until the count is at most the maximum", () => {
  // 1 TiB: 64 KiB blocks would be 16 Mi; 512 KiB blocks make exactly 2 Mi
  assertEquals(cbtGeometry(TiB / 512, DEFAULT_PARAMS), { blockSizeShift: 19, blockCount: 2097152 });
  assertEquals(cbtGeometry(TiB / 512 + 1, DEFAULT_PARAMS), {
    blockSizeShift: 20,
    blockCount: 1048577,
  });
});

Deno.test("cbtGeometry() never goes past shift 26, letting the count exceed the maximum", () => {
  const geometry = cbtGeometry(2 ** 50 / 512, DEFAULT_PARAMS); // 1 PiB
  assertEquals(geometry.blockSizeShift, 26);
  assertEquals(geometry.blockCount, 2 ** 24);
});

Deno.test("CbtMap.create() starts with active 1, previous 0 and zeroed maps", () => {
  const map = CbtMap.create(1000, params);
  assertEquals(map.snapNumberActive, 1);
  assertEquals(map.snapNumberPrevious, 0);
  assertEquals(map.blockCount, 125);
  assertEquals(map.writeMap.every((b) => b === 0), true);
  assertEquals(map.readMap.length, 125);
  assertTrue(/^[0-9a-f-]{36}$/.test(map.generationId));
});

Deno.test("CbtMap.mark() marks the write map with the active number only", () => {
  const map = CbtMap.create(1000, params);
  map.mark(7, 2); // sectors 7..8 span blocks 0 and 1
  assertEquals([...map.writeMap.subarray(0, 3)], [1, 1, 0]);
  assertEquals(map.readMap.every((b) => b === 0), true);
  map.mark(999, 1);
  assertEquals(map.writeMap[124], 1);
});

Deno.test("CbtMap.mark() past the map's end corrupts the map instead of failing (cbt_map_set)", async () => {
  const map = CbtMap.create(1000, params);
  await assertErrno(() => map.mark(-1, 1), "EINVAL");
  await assertErrno(() => map.mark(0.5, 1), "EINVAL");
  assertEquals(map.isCorrupted, false);
  // the device grew: the write is let through, the map is no longer trusted
  map.mark(999, 2);
  assertEquals(map.isCorrupted, true);
  assertEquals(map.writeMap[124], 0, "nothing marked");
  map.mark(0, 1); // a corrupted map is not maintained
  assertEquals(map.writeMap[0], 0);
});

Deno.test("CbtMap.markBoth() is EINVAL past the map's end and leaves the map as it is", async () => {
  const map = CbtMap.create(1000, params);
  await assertErrno(() => map.markBoth(999, 2), "EINVAL");
  await assertErrno(() => map.markBoth(-1, 1), "EINVAL");
  assertEquals(map.isCorrupted, false);
});

Deno.test("CbtMap.switch() copies the write map to the read map and advances", () => {
  const map = CbtMap.create(1000, params);
  map.mark(0, 8);
  map.switch();
  assertEquals(map.snapNumberPrevious, 1);
  assertEquals(map.snapNumberActive, 2);
  assertEquals(map.readMap[0], 1);
  map.mark(8, 8);
  assertEquals(map.writeMap[1], 2);
  assertEquals(map.readMap[1], 0, "the read map is frozen until the next take");
  assertEquals([...map.read(0, 2)], [1, 0]);
  assertEquals(map.info().changesNumber, 1);
});

Deno.test("CbtMap.switch() at the 255th take starts a new generation as the module does", () => {
  const map = CbtMap.create(1000, params);
  const generation = map.generationId;
  for (let i = 1; i < 255; i++) {
    map.mark(0, 1);
    map.switch();
  }
  assertEquals(map.snapNumberActive, 255);
  assertEquals(map.snapNumberPrevious, 254);
  assertEquals(map.generationId, generation);
  map.mark(8, 1);
  assertEquals(map.writeMap[1], 255);
  const readBefore = map.readMap.slice();
  map.switch(); // the take that would make active 256
  assertEquals(map.snapNumberActive, 1);
  assertEquals(map.snapNumberPrevious, 255);
  assertNotEquals(map.generationId, generation);
  assertEquals(map.writeMap.every((b) => b === 0), true, "the write map is zeroed");
  // cbt_map_switch does not refresh the read map at the wrap: block 1 (changed
  // in the last generation at 255) is missing; the new generation id tells a
  // backup tool to take a full backup
  assertEquals(map.readMap, readBefore);
  assertEquals(map.readMap[0], 254);
  assertEquals(map.readMap[1], 0);
  assertEquals(map.info().changesNumber, 255);
  // cbt_map_set_both marks the read map with previous (255)
  map.markBoth(16, 1);
  assertEquals([map.writeMap[2], map.readMap[2]], [1, 255]);
  map.mark(24, 1);
  map.switch(); // an ordinary take again
  assertEquals([map.snapNumberActive, map.snapNumberPrevious], [2, 1]);
  assertEquals([...map.read(0, 4)], [0, 0, 1, 1]);
  assertEquals(map.info().changesNumber, 1);
});

Deno.test("CbtMap.markBoth() marks the write map active and the read map previous", () => {
  const map = CbtMap.create(1000, params);
  map.switch();
  map.switch(); // active 3, previous 2
  map.markBoth(0, 1);
  assertEquals(map.writeMap[0], 3);
  assertEquals(map.readMap[0], 2);
  // never lowers a number
  map.mark(8, 1);
  map.switch(); // active 4, previous 3: block 1 = 3 in read map
  map.markBoth(8, 1);
  assertEquals(map.readMap[1], 3);
});

Deno.test("CbtMap.read() returns ENODATA past the end and EFAULT when corrupted", async () => {
  const map = CbtMap.create(1000, params);
  assertEquals(map.read(120, 5).length, 5);
  await assertErrno(() => map.read(120, 6), "ENODATA");
  await assertErrno(() => map.read(126, 0), "ENODATA");
  map.setCorrupted();
  await assertErrno(() => map.read(0, 1), "EFAULT");
  await assertErrno(() => map.markBoth(0, 1), "EINVAL");
});

Deno.test("CbtMap.reset() makes a fresh map of a new size and generation", () => {
  const map = CbtMap.create(1000, params);
  const generation = map.generationId;
  map.mark(0, 1);
  map.switch();
  map.setCorrupted();
  map.reset(2000, params);
  assertEquals(map.isCorrupted, false);
  assertEquals(map.blockCount, 250);
  assertEquals(map.snapNumberActive, 1);
  assertNotEquals(map.generationId, generation);
});

Deno.test("CbtMap.info() reports capacity, block size and count, generation, changes", () => {
  const map = CbtMap.create(1000, params);
  map.switch();
  const info = map.info();
  assertEquals(info.deviceCapacityBytes, 512000);
  assertEquals(info.blockSizeBytes, 4096);
  assertEquals(info.blockCount, 125);
  assertEquals(info.changesNumber, 1);
  assertEquals(info.generationId, map.generationId);
});

Deno.test("CbtMap.fromShared() sees the same maps and numbers (as a worker would)", () => {
  const map = CbtMap.create(1000, params);
  const other = CbtMap.fromShared(map.shared);
  map.mark(0, 1);
  map.switch();
  assertEquals(other.snapNumberActive, 2);
  assertEquals(other.readMap[0], 1);
  assertEquals(other.generationId, map.generationId);
  assertEquals(other.capacitySectors, 1000);
  assertEquals(other.switchSequence, 1);
});

Deno.test("uuidToBytes() and uuidFromBytes() round-trip", () => {
  const uuid = crypto.randomUUID();
  assertEquals(uuidFromBytes(uuidToBytes(uuid)), uuid);
});

Deno.test("CbtMap.check() keeps a map of the same geometry and refuses one cut short or of another device", () => {
  const capacitySectors = 2 ** 24 / 512;
  const map = CbtMap.create(capacitySectors, DEFAULT_PARAMS);
  map.mark(0, 8);
  map.switch();
  const copy = () => {
    const memory = new ArrayBuffer(map.byteLength);
    new Uint8Array(memory).set(new Uint8Array(map.shared));
    return memory;
  };
  const geometry = { capacitySectors, params: DEFAULT_PARAMS };
  assertEquals(CbtMap.check(copy(), geometry), null);
  assertEquals(
    CbtMap.check(copy(), { capacitySectors: capacitySectors * 2, params: DEFAULT_PARAMS }),
    "its size does not match the device",
  );
  const bigger = makeParams({ trackingBlockMinimumShift: 17 });
  assertEquals(
    CbtMap.check(copy(), { capacitySectors, params: bigger }),
    "its size does not match the device",
  );
  // A switch cut short: its "updating" word (byte 48) is still set.
  const cut = copy();
  new Int32Array(cut, 48, 1)[0] = 1;
  assertEquals(CbtMap.check(cut, geometry), "a switch or reset of it was cut short");
  const garbage = copy();
  new Int32Array(garbage, 0, 1)[0] = 0;
  assertEquals(CbtMap.check(garbage, geometry), "its snapshot numbers are out of range");
  // Finished switches and resets leave the word clear.
  map.resetInPlace();
  assertEquals(CbtMap.check(copy(), geometry), null);
});
