import { deepStrictEqual as assertEquals } from "node:assert/strict";
import { blockDeviceId, identifyBlockDevice, ublkParams } from "./block_device.ts";
import { BlksnapError } from "../../ffi/errno.ts";

Deno.test("blockDeviceId() takes major and minor from the MAJ:MIN key", () => {
  assertEquals(blockDeviceId("/dev/ublkb0", "259:1048576"), {
    path: "/dev/ublkb0",
    key: "259:1048576",
    major: 259,
    minor: 1048576,
  });
});

function reject(path: string): BlksnapError {
  try {
    identifyBlockDevice(path, "attach");
  } catch (err) {
    if (err instanceof BlksnapError) return err;
    throw err;
  }
  throw new Error(`${path} was accepted`);
}

Deno.test("identifyBlockDevice() says why a path is not a block device", () => {
  const missing = reject("/nonexistent/blksnap-test");
  assertEquals(missing.code, "ENOENT");
  assertEquals(
    missing.message,
    'Cannot attach "/nonexistent/blksnap-test": no such file or directory',
  );
  const file = Deno.makeTempFileSync();
  try {
    const e = reject(file);
    assertEquals(e.code, "ENOTBLK");
    assertEquals(e.message, `Cannot attach "${file}": it is a regular file, not a block device`);
  } finally {
    Deno.removeSync(file);
  }
  assertEquals(reject("/tmp").code, "ENOTBLK");
  assertEquals(reject("/dev/null").message.includes("a special file"), true);
});

const DISK = {
  sizeBytes: 1 << 30,
  logicalBlockSize: 512,
  physicalBlockSize: 4096,
  discardMaxBytes: 1 << 30,
  discardGranularity: 4096,
};

Deno.test("ublkParams() mirrors a writable original: write cache and discard", () => {
  const p = ublkParams(DISK, 512 * 1024, { writeCache: true });
  assertEquals(p.readOnly, false);
  assertEquals(p.writeCache, true);
  assertEquals(p.discard?.maxDiscardSectors, 2_097_152);
  assertEquals([p.logicalBsShift, p.physicalBsShift, p.maxSectors], [9, 12, 1024]);
});

Deno.test("ublkParams() of a read-only original: read-only, no write cache, no discard", () => {
  const p = ublkParams(DISK, 512 * 1024, { writeCache: true, readOnly: true });
  assertEquals(p.readOnly, true);
  assertEquals(p.writeCache, false);
  assertEquals(p.discard, undefined);
  assertEquals(p.devSectors, (1 << 30) / 512);
});
