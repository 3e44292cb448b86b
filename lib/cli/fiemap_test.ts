import {
  deepStrictEqual as assertEquals,
  ok as assert,
  throws as assertThrows,
} from "node:assert/strict";
import {
  decodeFiemap,
  encodeFiemapRequest,
  type Extent,
  extentsToRanges,
  fileDevicePath,
  fileExtents,
} from "./fiemap.ts";
import { FIEMAP, openLibc } from "../../ffi/libc.ts";
import { devTKey } from "../dev_t.ts";
import { CommandError } from "./command.ts";

Deno.test("encodeFiemapRequest() and decodeFiemap() follow struct fiemap's layout", () => {
  const buf = new Uint8Array(FIEMAP.HEADER_BYTES + 2 * FIEMAP.EXTENT_BYTES).fill(0xee);
  encodeFiemapRequest(buf, 4096, 2);
  const v = new DataView(buf.buffer);
  assertEquals(v.getBigUint64(0, true), 4096n);
  assertEquals(v.getBigUint64(8, true), 0xffff_ffff_ffff_ffffn);
  assertEquals([v.getUint32(16, true), v.getUint32(20, true), v.getUint32(24, true)], [1, 0, 2]);
  // what the kernel would write back: two extents
  v.setUint32(20, 2, true);
  const put = (i: number, logical: number, physical: number, length: number, flags: number) => {
    const o = FIEMAP.HEADER_BYTES + i * FIEMAP.EXTENT_BYTES;
    v.setBigUint64(o, BigInt(logical), true);
    v.setBigUint64(o + 8, BigInt(physical), true);
    v.setBigUint64(o + 16, BigInt(length), true);
    v.setUint32(o + 40, flags, true);
  };
  put(0, 0, 2 ** 40, 8192, 0);
  put(1, 8192, 512, 100, FIEMAP.EXTENT_LAST | FIEMAP.EXTENT_NOT_ALIGNED);
  assertEquals(decodeFiemap(buf), [
    { logical: 0, physical: 2 ** 40, length: 8192, flags: 0 },
    { logical: 8192, physical: 512, length: 100, flags: 0x101 },
  ]);
  v.setUint32(20, 3, true);
  assertThrows(() => decodeFiemap(buf), /3 extents for room for 2/);
});

Deno.test("extentsToRanges() rounds to sectors, sorts and merges", () => {
  const e = (physical: number, length: number, flags = 0): Extent => ({
    logical: 0,
    physical,
    length,
    flags,
  });
  assertEquals(extentsToRanges([e(4096, 8192)], "f"), [{ sector: 8, count: 16 }]);
  // unaligned start and end round outwards
  assertEquals(extentsToRanges([e(600, 100)], "f"), [{ sector: 1, count: 1 }]);
  assertEquals(extentsToRanges([e(1000, 100)], "f"), [{ sector: 1, count: 2 }]);
  assertEquals(extentsToRanges([e(1000, 600)], "f"), [{ sector: 1, count: 3 }]);
  // out of order, touching and overlapping ones merge; empty ones vanish
  assertEquals(
    extentsToRanges([e(8192, 4096), e(0, 4096), e(4096, 4096), e(1 << 20, 512), e(9000, 0)], "f"),
    [{ sector: 0, count: 24 }, { sector: 2048, count: 1 }],
  );
  assertEquals(extentsToRanges([], "f"), []);
  assertThrows(
    () => extentsToRanges([e(0, 4096, FIEMAP.EXTENT_UNKNOWN | FIEMAP.EXTENT_DELALLOC)], "/x"),
    (err: unknown) => err instanceof CommandError && /"\/x".*no known place/.test(err.message),
  );
});

const ffi = Deno.permissions.querySync({ name: "ffi" }).state === "granted";

/** FIEMAP on `path`, or the reason this filesystem cannot say. */
function tryExtents(path: string): Extent[] | string {
  const libc = openLibc();
  try {
    return fileExtents(libc, path);
  } catch (err) {
    if (/EOPNOTSUPP|ENOTTY/.test(String(err))) return String(err);
    throw err;
  } finally {
    libc.unload();
  }
}

/**
 * /dev/block/MAJ:MIN read-only, or /dev/DEVNAME from sysfs where no udev made
 * the link; undefined when neither opens (not root).
 */
function openDevice(path: string): Deno.FsFile | undefined {
  const candidates = [path];
  try {
    const uevent = Deno.readTextFileSync(`/sys/dev/block/${path.split("/").pop()}/uevent`);
    const name = /^DEVNAME=(.+)$/m.exec(uevent)?.[1];
    if (name) candidates.push(`/dev/${name}`);
  } catch {
    // no sysfs entry
  }
  for (const p of candidates) {
    try {
      return Deno.openSync(p, { read: true });
    } catch {
      // next
    }
  }
  return undefined;
}

Deno.test({
  name: "fileExtents() maps a real file with FIEMAP (needs --allow-ffi)",
  ignore: !ffi,
  async fn(t) {
    const dir = Deno.makeTempDirSync();
    try {
      // 1 MiB of data, a 1 MiB hole, 4 KiB of data: two extents at least, a gap in between
      const path = `${dir}/data`;
      const f = Deno.openSync(path, { write: true, create: true });
      f.writeSync(new Uint8Array(1 << 20).fill(1));
      f.seekSync(2 << 20, Deno.SeekMode.Start);
      f.writeSync(new Uint8Array(4096).fill(2));
      f.close();
      const extents = tryExtents(path);
      if (typeof extents === "string") {
        throw new Error(`FIEMAP is not supported on ${dir}'s filesystem: ${extents}`);
      }
      const bytes = extents.reduce((a, x) => a + x.length, 0);
      assertEquals(bytes, (1 << 20) + 4096, JSON.stringify(extents));
      assert(extents.every((x) => x.logical < (1 << 20) || x.logical >= (2 << 20)));
      assert(extents[extents.length - 1]!.flags & FIEMAP.EXTENT_LAST);
      const ranges = extentsToRanges(extents, path);
      assertEquals(ranges.reduce((a, r) => a + r.count, 0), ((1 << 20) + 4096) / 512);
      // the device: /dev/block/MAJ:MIN of st_dev
      const info = Deno.statSync(path);
      assertEquals(fileDevicePath(info), `/dev/block/${devTKey(info.dev)}`);
      // what FIEMAP says is where the data is (when the device may be read: root)
      const first = extents[0]!;
      const dev = openDevice(fileDevicePath(info));
      await t.step({
        name: "the first extent's sectors on the device hold the file's bytes",
        ignore: dev === undefined,
        fn() {
          const got = new Uint8Array(4096);
          dev!.seekSync(first.physical, Deno.SeekMode.Start);
          let off = 0;
          while (off < got.length) off += dev!.readSync(got.subarray(off)) ?? got.length;
          assertEquals(got, new Uint8Array(4096).fill(first.logical < (1 << 20) ? 1 : 2));
        },
      });
      dev?.close();
      // an empty file has no extents at all
      Deno.writeFileSync(`${dir}/empty`, new Uint8Array(0));
      assertEquals(tryExtents(`${dir}/empty`), []);
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  },
});
