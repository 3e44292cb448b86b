import { assertEquals, assertErrno } from "./_assert.ts";
import { DEFAULT_PARAMS, makeParams, PARAM_SPECS, resolveParams } from "./params.ts";

Deno.test("DEFAULT_PARAMS are the kernel module's defaults, then the stall watchdog's 30 s", () => {
  assertEquals(DEFAULT_PARAMS, {
    trackingBlockMinimumShift: 16,
    trackingBlockMaximumCount: 2097152,
    trackingBlockMaximumShift: 26,
    chunkMinimumShift: 18,
    chunkMaximumCountShift: 40,
    chunkMaximumShift: 26,
    chunkMaximumInQueue: 16,
    freeDiffBufferPoolSize: 128,
    diffStorageMinimumSectors: 2097152,
    cowStallTimeoutMs: 30000,
  });
  assertEquals(PARAM_SPECS.map((spec) => spec.name), [
    "tracking_block_minimum_shift",
    "tracking_block_maximum_count",
    "tracking_block_maximum_shift",
    "chunk_minimum_shift",
    "chunk_maximum_count_shift",
    "chunk_maximum_shift",
    "chunk_maximum_in_queue",
    "free_diff_buffer_pool_size",
    "diff_storage_minimum",
    "cow_stall_timeout_ms",
  ]);
});

Deno.test("resolveParams() rejects out-of-range and fractional values with EINVAL", async () => {
  await assertErrno(() => resolveParams({ chunkMaximumInQueue: 0 }), "EINVAL");
  await assertErrno(() => resolveParams({ trackingBlockMinimumShift: 8 }), "EINVAL");
  await assertErrno(() => resolveParams({ freeDiffBufferPoolSize: 1.5 }), "EINVAL");
  await assertErrno(() => resolveParams({ cowStallTimeoutMs: 0 }), "EINVAL");
});

Deno.test("resolveParams() fixes values the way parameters_init does", () => {
  const { params, warnings } = resolveParams({
    trackingBlockMinimumShift: 20,
    trackingBlockMaximumShift: 18,
    chunkMinimumShift: 16,
    chunkMaximumShift: 12,
    diffStorageMinimumSectors: 300,
  });
  assertEquals(params.trackingBlockMaximumShift, 20);
  assertEquals(params.chunkMaximumShift, 16);
  // at least two minimal chunks (2 * 128 sectors), then a multiple of one
  assertEquals(params.diffStorageMinimumSectors, 256);
  assertEquals(warnings.length, 3);
  assertEquals(
    makeParams({ diffStorageMinimumSectors: 1000, chunkMinimumShift: 12 })
      .diffStorageMinimumSectors,
    1000,
  );
});
