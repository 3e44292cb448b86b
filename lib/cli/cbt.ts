/**
 * Change-block tracking: cbtinfo, readcbtmap, markdirtyblock. None of them
 * starts the daemon: without one nothing is tracked (exit 3).
 */
import { resolve } from "node:path";
import {
  type Command,
  CommandError,
  EXIT,
  noPositionals,
  requireString,
  UsageError,
} from "./command.ts";
import { parseRanges, stringList } from "./parse.ts";
import { extentsToRanges, fileDevicePath, fileExtents } from "./fiemap.ts";
import {
  type CbtInfoResult,
  type MarkDirtyResult,
  MAX_LINE_BYTES,
  MAX_RANGES,
  type SectorRange,
} from "../daemon/protocol.ts";
import { openLibc } from "../../ffi/libc.ts";

const NOT_TRACKED = "no device is tracked";

/** The tool's cbtinfo lines. */
export function cbtInfoText(r: CbtInfoResult): string {
  return [
    `block_size=${r.blockSize}`,
    `device_capacity=${r.deviceCapacity}`,
    `block_count=${r.blockCount}`,
    `generation_id=${r.generationId}`,
    `changes_number=${r.changesNumber}`,
  ].join("\n");
}

export const cbtinfo: Command = {
  name: "cbtinfo",
  summary: "Show a tracked device's change tracker: block size, count, generation, changes.",
  usage: "blksnap cbtinfo --device DEVICE",
  help: `Options:
  -d, --device DEVICE   the original, its tracked device, or /dev/block/MAJ:MIN of either

Prints, one per line:
  block_size=BYTES        bytes per tracking block
  device_capacity=BYTES   the device's size
  block_count=N           blocks in the change map (one byte each)
  generation_id=UUID      changes when the map is reset (after 255 snapshots):
                          a backup of another generation must be a full one
  changes_number=N        0..255, the change number of the last snapshot taken

Does not start the daemon (exit 3 when none runs).`,
  options: { device: { type: "string", short: "d" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const device = resolve(requireString(values, "device", this));
    const client = await ctx.runningDaemon(NOT_TRACKED);
    const r = await ctx.call(client, "cbtinfo", { device });
    ctx.print(r, cbtInfoText(r));
    return EXIT.OK;
  },
};

/** base64 -> bytes. */
export function decodeBase64(text: string): Uint8Array {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export const readcbtmap: Command = {
  name: "readcbtmap",
  summary: "Write a tracked device's change map to a file: one byte per block.",
  usage: "blksnap readcbtmap --device DEVICE --file FILE",
  help: `Options:
  -d, --device DEVICE   the original, its tracked device, or /dev/block/MAJ:MIN of either
  -f, --file FILE       the output file (created or truncated)

Writes block_count bytes (see cbtinfo): byte N is the change number of block N
as of the last snapshot taken. A block changed since the backup made from the
snapshot with change number C holds a number greater than C. The map stays
readable after the snapshot is destroyed. Prints nothing; --json prints the
cbtinfo fields with the file and the number of bytes written.

Does not start the daemon (exit 3 when none runs).`,
  options: { device: { type: "string", short: "d" }, file: { type: "string", short: "f" } },
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const device = resolve(requireString(values, "device", this));
    const file = resolve(requireString(values, "file", this));
    const client = await ctx.runningDaemon(NOT_TRACKED);
    const { map, ...info } = await ctx.call(client, "readcbtmap", { device });
    let bytes: Uint8Array;
    try {
      bytes = decodeBase64(map);
    } catch {
      throw new CommandError("EPROTO", "The daemon sent a change map that is not base64");
    }
    if (bytes.length !== info.blockCount) {
      throw new CommandError(
        "EPROTO",
        `The daemon sent a change map of ${bytes.length} bytes for ${info.blockCount} blocks`,
      );
    }
    try {
      Deno.writeFileSync(file, bytes);
    } catch (err) {
      throw new CommandError("EIO", `Cannot write "${file}": ${(err as Error).message}`);
    }
    ctx.print({ ...info, file, bytes: bytes.length }, null);
    return EXIT.OK;
  },
};

/**
 * Splits `ranges` into lists that each fit one request line (MAX_LINE_BYTES)
 * and MAX_RANGES.
 */
export function chunkRanges(device: string, ranges: SectorRange[]): SectorRange[][] {
  const budget = MAX_LINE_BYTES - 256 - JSON.stringify(device).length;
  const chunks: SectorRange[][] = [];
  let cur: SectorRange[] = [];
  let size = 0;
  for (const r of ranges) {
    const n = JSON.stringify(r).length + 1;
    if (cur.length > 0 && (size + n > budget || cur.length >= MAX_RANGES)) {
      chunks.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(r);
    size += n;
  }
  if (cur.length > 0) chunks.push(cur);
  return chunks;
}

export const markdirtyblock: Command = {
  name: "markdirtyblock",
  summary: "Mark sectors, or the sectors of a file, as changed in the change map.",
  usage: "blksnap markdirtyblock {--file FILE | --device DEVICE --range SECTOR:COUNT...}",
  help: `Options:
  -f, --file FILE                the file whose blocks are to count as changed; its
                                 device is found from the file (/dev/block/MAJ:MIN of
                                 the filesystem it is on, which must be a tracked
                                 device) and its extents with FIEMAP
  -d, --device DEVICE            the original, its tracked device, or /dev/block/MAJ:MIN
  -r, --range, --ranges SECTOR:COUNT
                                 512-byte sectors; repeatable, and one option takes
                                 several ranges separated by spaces or commas or as
                                 the following words (-r 0:8 4096:16)

The blocks are marked in both maps: the next incremental backup reads them,
and readcbtmap shows them at once. With --file prints
  device path: '/dev/block/MAJ:MIN'
  allocate range: ofs=SECTOR cnt=COUNT      (one line per range)
and with --device nothing. An empty file (no blocks on the device) is an error.

Does not start the daemon (exit 3 when none runs).`,
  options: {
    file: { type: "string", short: "f" },
    device: { type: "string", short: "d" },
    range: { type: "string", short: "r", multiple: true },
    ranges: { type: "string", multiple: true },
  },
  multitoken: ["range", "ranges"],
  async run(ctx, values, positionals) {
    noPositionals(this, positionals);
    const rangeTexts = stringList(values, "range", "ranges");
    let device: string;
    let ranges: SectorRange[];
    let file: string | undefined;
    if (values.file !== undefined) {
      if (values.device !== undefined || rangeTexts.length > 0) {
        throw new UsageError(`${this.name}: give --file, or --device with --range, not both`);
      }
      file = resolve(requireString(values, "file", this));
      let info: Deno.FileInfo;
      try {
        info = Deno.statSync(file);
      } catch (err) {
        if (err instanceof Deno.errors.NotFound) {
          throw new CommandError("ENOENT", `"${file}" does not exist`);
        }
        throw new CommandError("EIO", `Cannot stat "${file}": ${(err as Error).message}`);
      }
      if (!info.isFile) throw new CommandError("EINVAL", `"${file}" is not a regular file`);
      device = fileDevicePath(info);
      const libc = openLibc();
      try {
        ranges = extentsToRanges(fileExtents(libc, file), file);
      } finally {
        libc.unload();
      }
      if (ranges.length === 0) {
        throw new CommandError(
          "ENODATA",
          `"${file}" has no blocks on the device (it is empty or all holes): nothing to mark`,
        );
      }
    } else {
      device = resolve(requireString(values, "device", this));
      if (rangeTexts.length === 0) throw new UsageError(`${this.name}: --range is required`);
      ranges = parseRanges(rangeTexts, "range");
      if (ranges.length === 0) throw new UsageError(`${this.name}: --range is required`);
    }
    const client = await ctx.runningDaemon(NOT_TRACKED);
    let result: MarkDirtyResult | undefined;
    for (const chunk of chunkRanges(device, ranges)) {
      const r = await ctx.call(client, "markdirtyblock", { device, ranges: chunk });
      result = result ? { ...result, ranges: [...result.ranges, ...r.ranges] } : r;
    }
    const text = file === undefined ? null : [
      `device path: '${device}'`,
      ...ranges.map((r) => `allocate range: ofs=${r.sector} cnt=${r.count}`),
    ].join("\n");
    ctx.print(file === undefined ? result : { ...result, file }, text);
    return EXIT.OK;
  },
};
