import { deepStrictEqual as assertEquals, throws as assertThrows } from "node:assert/strict";
import { decodeDevT, deviceKey, devTKey, encodeDevT, parseDeviceKey } from "./dev_t.ts";

/** The kernel's new_encode_dev(): 12-bit major, 20-bit minor, 32 bits. */
function kernelNewEncodeDev(major: number, minor: number): number {
  return ((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0;
}

Deno.test("decodeDevT() reads the devices met every day", () => {
  assertEquals(decodeDevT(0x0700), { major: 7, minor: 0 }); // loop0
  assertEquals(decodeDevT(0x0811), { major: 8, minor: 17 }); // sdb1
  assertEquals(decodeDevT(0x103_00), { major: 259, minor: 0 }); // ublkb0, nvme0n1
  assertEquals(devTKey(0x0811), "8:17");
});

Deno.test("decodeDevT() and encodeDevT() agree at the edges of each field", () => {
  const edges: Array<[number, number]> = [
    [0, 0],
    [1, 255],
    [1, 256],
    [259, 2 ** 20 - 1],
    [259, 2 ** 20],
    [259, 2 ** 32 - 1],
    [4095, 0],
    [4096, 0],
    [4096, 2 ** 20],
    [2 ** 20, 7],
    [2 ** 32 - 1, 2 ** 32 - 1],
  ];
  for (const [major, minor] of edges) {
    const dev = encodeDevT({ major, minor });
    assertEquals(decodeDevT(dev), { major, minor }, `${major}:${minor}`);
    if (dev <= BigInt(Number.MAX_SAFE_INTEGER)) {
      assertEquals(decodeDevT(Number(dev)), { major, minor }, `${major}:${minor} as a number`);
    }
  }
});

Deno.test("encodeDevT() is glibc's makedev(): bit positions at the edges", () => {
  assertEquals(encodeDevT({ major: 0, minor: 255 }), 0xffn);
  assertEquals(encodeDevT({ major: 0, minor: 256 }), 0x10_0000n); // minor bit 8 -> dev bit 20
  assertEquals(encodeDevT({ major: 0, minor: 2 ** 20 - 1 }), 0xfff0_00ffn);
  assertEquals(encodeDevT({ major: 0, minor: 2 ** 20 }), 0x1_0000_0000n); // -> dev bit 32
  assertEquals(encodeDevT({ major: 4095, minor: 0 }), 0xf_ff00n);
  assertEquals(encodeDevT({ major: 4096, minor: 0 }), 0x1000_0000_0000n); // -> dev bit 44
});

Deno.test("decodeDevT() reads the kernel's 32-bit new_encode_dev() the same way", () => {
  for (const [major, minor] of [[7, 0], [8, 17], [259, 255], [259, 256], [4095, 2 ** 20 - 1]]) {
    const dev = kernelNewEncodeDev(major!, minor!);
    assertEquals(decodeDevT(dev), { major, minor });
    assertEquals(BigInt(dev), encodeDevT({ major: major!, minor: minor! }));
  }
});

Deno.test("decodeDevT() refuses what is not a dev_t", () => {
  assertThrows(() => decodeDevT(-1), RangeError);
  assertThrows(() => decodeDevT(1.5), RangeError);
  assertThrows(() => decodeDevT(2 ** 53), RangeError);
  assertThrows(() => decodeDevT(-1n), RangeError);
  assertThrows(() => decodeDevT(2n ** 64n), RangeError);
  assertThrows(() => encodeDevT({ major: 2 ** 32, minor: 0 }), RangeError);
  assertThrows(() => encodeDevT({ major: 0, minor: -1 }), RangeError);
});

Deno.test("deviceKey() and parseDeviceKey() are each other's inverse", () => {
  assertEquals(deviceKey({ major: 259, minor: 2 ** 20 }), "259:1048576");
  assertEquals(parseDeviceKey("259:1048576"), { major: 259, minor: 2 ** 20 });
  assertEquals(parseDeviceKey("8:17"), { major: 8, minor: 17 });
  for (const bad of ["", "8", "8:", ":17", "8:17:1", "-8:17", "8:1x", "4294967296:0", " 8:17"]) {
    assertEquals(parseDeviceKey(bad), undefined, JSON.stringify(bad));
  }
});
