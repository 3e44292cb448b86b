/**
 * A file's extents on its block device, with FIEMAP, for `markdirtyblock --file`:
 * the byte extents become 512-byte sector ranges, and the device is
 * /dev/block/MAJ:MIN of the file's st_dev.
 */
import { FIEMAP, type Libc, O } from "../../ffi/libc.ts";
import { devTKey } from "../dev_t.ts";
import type { SectorRange } from "../daemon/protocol.ts";
import { CommandError } from "./command.ts";

export interface Extent {
  /** Offset in the file, bytes. */
  logical: number;
  /** Offset on the device, bytes. */
  physical: number;
  length: number;
  flags: number;
}

/** Extents asked for per ioctl. */
const EXTENTS_PER_CALL = 512;
const SECTOR = 512;

/** Fills the fiemap header of `buf` for a call from `start` to the end of the file. */
export function encodeFiemapRequest(buf: Uint8Array, start: number, extentCount: number): void {
  buf.fill(0, 0, FIEMAP.HEADER_BYTES);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  v.setBigUint64(0, BigInt(start), true); // fm_start
  v.setBigUint64(8, FIEMAP.MAX_OFFSET, true); // fm_length
  v.setUint32(16, FIEMAP.FLAG_SYNC, true); // fm_flags
  v.setUint32(20, 0, true); // fm_mapped_extents
  v.setUint32(24, extentCount, true); // fm_extent_count
}

/** The extents the kernel wrote into `buf`. */
export function decodeFiemap(buf: Uint8Array): Extent[] {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const mapped = v.getUint32(20, true);
  const room = Math.floor((buf.byteLength - FIEMAP.HEADER_BYTES) / FIEMAP.EXTENT_BYTES);
  if (mapped > room) throw new Error(`FIEMAP reported ${mapped} extents for room for ${room}`);
  const extents: Extent[] = [];
  for (let i = 0; i < mapped; i++) {
    const o = FIEMAP.HEADER_BYTES + i * FIEMAP.EXTENT_BYTES;
    extents.push({
      logical: Number(v.getBigUint64(o, true)),
      physical: Number(v.getBigUint64(o + 8, true)),
      length: Number(v.getBigUint64(o + 16, true)),
      flags: v.getUint32(o + 40, true),
    });
  }
  return extents;
}

/** Every extent of the file at `path` (FIEMAP_FLAG_SYNC: delayed allocations are made first). */
export function fileExtents(libc: Libc, path: string): Extent[] {
  const fd = libc.open(path, O.RDONLY | O.CLOEXEC);
  try {
    const buf = new Uint8Array(FIEMAP.HEADER_BYTES + EXTENTS_PER_CALL * FIEMAP.EXTENT_BYTES);
    const all: Extent[] = [];
    let start = 0;
    for (;;) {
      encodeFiemapRequest(buf, start, EXTENTS_PER_CALL);
      libc.check(libc.sym.ioctl(fd, FIEMAP.FS_IOC_FIEMAP, buf), `ioctl(FS_IOC_FIEMAP, "${path}")`);
      const extents = decodeFiemap(buf);
      if (extents.length === 0) return all;
      all.push(...extents);
      const last = extents[extents.length - 1]!;
      if (last.flags & FIEMAP.EXTENT_LAST) return all;
      const next = last.logical + last.length;
      if (next <= start) return all; // no progress: never loop forever
      start = next;
    }
  } finally {
    libc.close(fd);
  }
}

/**
 * Byte extents -> sector ranges: the start rounded down and the end up to
 * 512 bytes, sorted, overlapping and touching ranges merged. An extent whose
 * place on the device is not known yet is an error.
 */
export function extentsToRanges(extents: Extent[], path: string): SectorRange[] {
  const spans: Array<[number, number]> = [];
  for (const e of extents) {
    if (e.flags & (FIEMAP.EXTENT_UNKNOWN | FIEMAP.EXTENT_DELALLOC)) {
      throw new CommandError(
        "EIO",
        `The extent of "${path}" at byte ${e.logical} has no known place on the device yet`,
      );
    }
    if (e.length === 0) continue;
    spans.push([
      Math.floor(e.physical / SECTOR),
      Math.ceil((e.physical + e.length) / SECTOR),
    ]);
  }
  spans.sort((a, b) => a[0] - b[0]);
  const ranges: SectorRange[] = [];
  let cur: [number, number] | undefined;
  for (const s of spans) {
    if (cur && s[0] <= cur[1]) cur[1] = Math.max(cur[1], s[1]);
    else {
      if (cur) ranges.push({ sector: cur[0], count: cur[1] - cur[0] });
      cur = [s[0], s[1]];
    }
  }
  if (cur) ranges.push({ sector: cur[0], count: cur[1] - cur[0] });
  return ranges;
}

/** /dev/block/MAJ:MIN of the device holding the file (its st_dev). */
export function fileDevicePath(info: Deno.FileInfo): string {
  return `/dev/block/${devTKey(info.dev)}`;
}
