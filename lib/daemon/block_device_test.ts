import { deepStrictEqual as assertEquals } from "node:assert/strict";
import { deviceKey, identifyBlockDevice, splitDevT, ublkParams } from "./block_device.ts";
import { BlksnapError } from "../engine/errors.ts";

Deno.test("splitDevT() decodes glibc's dev_t encoding", () => {
  assertEquals(splitDevT(0x0700), { major: 7, minor: 0 }); // loop0
  assertEquals(splitDevT(0x0811), { major: 8, minor: 17 }); // sdb1
  assertEquals(splitDevT(0x103_00), { major: 259, minor: 0 }); // ublkb0, nvme
  // major 259 minor 300: minor's high bits live at bits 20..31
  assertEquals(splitDevT((259 << 8) | (300 & 0xff) | ((300 & ~0xff) << 12)), {
    major: 259,
    minor: 300,
  });
  assertEquals(deviceKey({ major: 8, minor: 17 }), "8:17");
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
