/**
 * qcow2 images, written and read by us (never by shelling out to qemu-img),
 * for backup points that standard tools open: `qemu-img info
 * --backing-chain`, `check`, `compare` and `convert`, and `qemu-nbd`.
 *
 * The subset written (docs/qcow2.md has the format as we rely on it):
 * version 3, 16-bit refcounts, no snapshots, no encryption, one optional
 * backing file (format qcow2, named by a header extension). Clusters are
 * appended as a backup streams them (data, or deflate-compressed data);
 * L2 tables, the L1 table and the refcount structures are written at the
 * end, then the header. A cluster that reads as zeroes is never stored: it
 * is left unallocated in an image without a backing file, and marked with
 * the zero flag (v3) in one with a backing file, so that it does not show
 * the backing file's content. A cluster not written at all reads through
 * to the backing file: that is what makes an incremental point small.
 *
 * Every field is big-endian. Host offsets are kept as two 32-bit halves, so
 * the tables need no BigInt.
 *
 * @module
 */
import { deflateRawSync, inflateRawSync } from "node:zlib";
import { BlksnapError } from "../engine/errors.ts";

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
/** Header extension: the backing file's format name. */
const EXT_BACKING_FORMAT = 0xe2792aca;
const HEADER_V3_BYTES = 104;
const REFCOUNT_ORDER = 4; // 16-bit refcounts
const TWO_32 = 4_294_967_296;

/** L2 (and L1) entry flags, in the high 32-bit half. */
const FLAG_COPIED = 0x8000_0000; // bit 63: refcount is exactly 1
const FLAG_COMPRESSED = 0x4000_0000; // bit 62
/** Bit 0 of a standard L2 entry (v3): the cluster reads as zeroes. */
const FLAG_ZERO = 1;

export interface Qcow2WriterOptions {
  /** The virtual disk size in bytes (a multiple of 512). */
  sizeBytes: number;
  /** log2 of the cluster size: 9 to 21 (default 16, qemu-img's 64 KiB). */
  clusterBits?: number;
  /** The backing file as recorded in the image (a path relative to the image's directory). */
  backingFile?: string;
  /** Store clusters deflate-compressed when that makes them smaller. */
  compress?: boolean;
}

/** Where one virtual cluster's data is, as read from an L2 entry. */
export type ClusterKind = "unallocated" | "zero" | "data" | "compressed";

function u64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / TWO_32));
  view.setUint32(at + 4, value >>> 0);
}

function readU64(view: DataView, at: number): number {
  const hi = view.getUint32(at);
  if (hi >= 0x20_0000) {
    throw new BlksnapError("EINVAL", `qcow2: a 64-bit field at ${at} is too large (${hi} << 32)`);
  }
  return hi * TWO_32 + view.getUint32(at + 4);
}

function writeAll(file: Deno.FsFile, at: number, data: Uint8Array): void {
  file.seekSync(at, Deno.SeekMode.Start);
  let done = 0;
  while (done < data.length) done += file.writeSync(data.subarray(done));
}

function readAll(file: Deno.FsFile, at: number, into: Uint8Array): number {
  file.seekSync(at, Deno.SeekMode.Start);
  let done = 0;
  while (done < into.length) {
    const n = file.readSync(into.subarray(done));
    if (n === null) break;
    done += n;
  }
  return done;
}

/**
 * A cluster's content deflated as qcow2 stores it (raw deflate, 4 KiB
 * window), or null when that does not save at least a sector (qemu's rule
 * too): then it is stored as it is. `data` shorter than a cluster (the
 * disk's last) is padded with zeroes first.
 */
export function compressCluster(data: Uint8Array, clusterBytes: number): Uint8Array | null {
  let payload = data;
  if (data.length < clusterBytes) {
    payload = new Uint8Array(clusterBytes);
    payload.set(data);
  }
  const packed = deflateRawSync(payload, { level: 6, windowBits: 12 });
  if (packed.length > clusterBytes - 512) return null;
  return new Uint8Array(packed.buffer, packed.byteOffset, packed.length);
}

/** True when every byte of `data` is 0. */
export function isZero(data: Uint8Array): boolean {
  // Word-wise where aligned: cluster buffers are.
  if ((data.byteOffset & 3) === 0 && (data.length & 3) === 0) {
    const w = new Uint32Array(data.buffer, data.byteOffset, data.length >>> 2);
    for (let i = 0; i < w.length; i++) if (w[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}

/**
 * Writes a qcow2 image. Clusters may come in any order, each at most once;
 * `finish()` writes the metadata and syncs the file. The caller writes to a
 * temporary name and renames it once finish() returned.
 */
export class Qcow2Writer {
  readonly sizeBytes: number;
  readonly clusterBits: number;
  readonly clusterBytes: number;
  readonly clusterCount: number;
  readonly #file: Deno.FsFile;
  readonly #backing: string | undefined;
  readonly #compress: boolean;
  readonly #l2Entries: number;
  readonly #l1Size: number;
  /** L2 tables by L1 index: [hi, lo] per entry. */
  readonly #l2 = new Map<number, Uint32Array>();
  /** Refcounts of host clusters, grown as clusters are appended. */
  #refcounts = new Uint16Array(1024);
  /** Next free host byte (data is appended; compressed data packs). */
  #end: number;
  #finished = false;
  /** Clusters stored, by kind. */
  readonly stats = { data: 0, compressed: 0, zero: 0, storedBytes: 0 };

  private constructor(file: Deno.FsFile, options: Qcow2WriterOptions) {
    const clusterBits = options.clusterBits ?? 16;
    if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
      throw new BlksnapError("EINVAL", `qcow2: cluster bits ${clusterBits} not in 9..21`);
    }
    if (!Number.isSafeInteger(options.sizeBytes) || options.sizeBytes <= 0) {
      throw new BlksnapError("EINVAL", `qcow2: bad virtual size ${options.sizeBytes}`);
    }
    if (options.sizeBytes % 512 !== 0) {
      throw new BlksnapError("EINVAL", `qcow2: size ${options.sizeBytes} is not a multiple of 512`);
    }
    const backing = options.backingFile;
    if (
      backing !== undefined && (backing === "" || new TextEncoder().encode(backing).length > 1023)
    ) {
      throw new BlksnapError("EINVAL", "qcow2: the backing file name must have 1 to 1023 bytes");
    }
    this.#file = file;
    this.sizeBytes = options.sizeBytes;
    this.clusterBits = clusterBits;
    this.clusterBytes = 2 ** clusterBits;
    this.clusterCount = Math.ceil(this.sizeBytes / this.clusterBytes);
    this.#backing = backing;
    this.#compress = options.compress ?? false;
    this.#l2Entries = this.clusterBytes / 8;
    this.#l1Size = Math.ceil(this.clusterCount / this.#l2Entries);
    // Cluster 0: the header, written last.
    this.#end = this.clusterBytes;
    this.#ref(0, 1);
  }

  /** Creates (or truncates) `path` and returns a writer for it. */
  static create(path: string, options: Qcow2WriterOptions): Qcow2Writer {
    const file = Deno.openSync(path, { read: true, write: true, create: true, truncate: true });
    try {
      return new Qcow2Writer(file, options);
    } catch (err) {
      file.close();
      throw err;
    }
  }

  /**
   * Stores virtual cluster `index`: `data` is its content (clusterBytes, or
   * less for the last cluster of the disk). A cluster of zeroes is not stored.
   */
  writeCluster(index: number, data: Uint8Array): void {
    this.#check(index);
    const want = Math.min(this.clusterBytes, this.sizeBytes - index * this.clusterBytes);
    if (data.length !== want) {
      throw new BlksnapError(
        "EINVAL",
        `qcow2: cluster ${index} has ${data.length} bytes, not ${want}`,
      );
    }
    if (isZero(data)) {
      this.zeroCluster(index);
      return;
    }
    if (this.#compress) {
      const packed = compressCluster(data, this.clusterBytes);
      if (packed !== null) {
        this.storeCompressed(index, packed);
        return;
      }
    }
    this.storeData(index, data);
  }

  /**
   * Stores virtual clusters `index`, `index + 1`... as they are, in one
   * write: `data` holds whole clusters (the disk's last may be short), each
   * known not to be all zeroes and not worth compressing (compressCluster()
   * said so). The copy workers decide that off this thread; writeCluster()
   * decides it here. The layout is the same as one call per cluster.
   */
  storeData(index: number, data: Uint8Array): void {
    const cb = this.clusterBytes;
    const count = Math.max(1, Math.ceil(data.length / cb));
    const slots: Array<{ table: Uint32Array; at: number }> = [];
    for (let k = 0; k < count; k++) {
      slots.push(this.#entry(index + k, Math.min(cb, data.length - k * cb)));
    }
    let payload = data;
    if (data.length < count * cb) {
      payload = new Uint8Array(count * cb);
      payload.set(data);
    }
    this.#end = Math.ceil(this.#end / cb) * cb;
    const offset = this.#end;
    writeAll(this.#file, offset, payload);
    this.#end += count * cb;
    for (let k = 0; k < count; k++) {
      const { table, at } = slots[k]!;
      const host = offset + k * cb;
      this.#ref(host / cb, 1);
      table[at] = (FLAG_COPIED | Math.floor(host / TWO_32)) >>> 0;
      table[at + 1] = host >>> 0;
    }
    this.stats.data += count;
    this.stats.storedBytes += count * cb;
  }

  /**
   * Marks virtual cluster `index` as reading zeroes. Without a backing file
   * an unwritten cluster reads as zeroes already, so nothing is recorded.
   */
  zeroCluster(index: number): void {
    this.#check(index);
    if (this.#backing === undefined) return;
    const table = this.#table(index);
    const at = (index % this.#l2Entries) * 2;
    if (table[at] !== 0 || table[at + 1] !== 0) {
      throw new BlksnapError("EEXIST", `qcow2: cluster ${index} written twice`);
    }
    table[at + 1] = FLAG_ZERO;
    this.stats.zero++;
  }

  /** Stores virtual cluster `index` as `packed`, what compressCluster() made of it. */
  storeCompressed(index: number, packed: Uint8Array): void {
    if (packed.length === 0 || packed.length > this.clusterBytes - 512) {
      throw new BlksnapError(
        "EINVAL",
        `qcow2: compressed cluster ${index} has ${packed.length} bytes`,
      );
    }
    const { table, at } = this.#entry(index, null);
    this.#putCompressed(table, at, packed);
  }

  /** The free L2 slot of cluster `index`; `length`: the data's, checked against the cluster's. */
  #entry(index: number, length: number | null): { table: Uint32Array; at: number } {
    this.#check(index);
    if (length !== null) {
      const want = Math.min(this.clusterBytes, this.sizeBytes - index * this.clusterBytes);
      if (length !== want) {
        throw new BlksnapError(
          "EINVAL",
          `qcow2: cluster ${index} has ${length} bytes, not ${want}`,
        );
      }
    }
    const table = this.#table(index);
    const at = (index % this.#l2Entries) * 2;
    if (table[at] !== 0 || table[at + 1] !== 0) {
      throw new BlksnapError("EEXIST", `qcow2: cluster ${index} written twice`);
    }
    return { table, at };
  }

  #putCompressed(table: Uint32Array, at: number, packed: Uint8Array): void {
    const offset = this.#end;
    writeAll(this.#file, offset, packed);
    this.#end += packed.length;
    // Every host cluster the compressed bytes touch counts one reference.
    const first = Math.floor(offset / this.clusterBytes);
    const last = Math.floor((offset + packed.length - 1) / this.clusterBytes);
    for (let c = first; c <= last; c++) this.#ref(c, 1);
    const sectors = Math.floor((offset + packed.length - 1) / 512) - Math.floor(offset / 512);
    // Bits 0..x-1 hold the byte offset, x..61 the additional sectors (x = 62 - (bits - 8)).
    // (x - 32 is 21..29: the sector count sits in the high half alone.)
    const x = 62 - (this.clusterBits - 8);
    table[at] = (FLAG_COMPRESSED | (sectors << (x - 32)) | Math.floor(offset / TWO_32)) >>> 0;
    table[at + 1] = offset >>> 0;
    this.stats.compressed++;
    this.stats.storedBytes += packed.length;
  }

  #check(index: number): void {
    if (this.#finished) throw new BlksnapError("EINVAL", "qcow2: the image is finished");
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.clusterCount) {
      throw new BlksnapError(
        "EINVAL",
        `qcow2: cluster ${index} outside the disk (${this.clusterCount} clusters)`,
      );
    }
  }

  #table(index: number): Uint32Array {
    const l1 = Math.floor(index / this.#l2Entries);
    let t = this.#l2.get(l1);
    if (t === undefined) {
      t = new Uint32Array(this.#l2Entries * 2);
      this.#l2.set(l1, t);
    }
    return t;
  }

  #ref(cluster: number, add: number): void {
    if (cluster >= this.#refcounts.length) {
      const grown = new Uint16Array(Math.max(cluster + 1, this.#refcounts.length * 2));
      grown.set(this.#refcounts);
      this.#refcounts = grown;
    }
    const v = this.#refcounts[cluster]! + add;
    if (v > 0xffff) throw new BlksnapError("EOVERFLOW", `qcow2: refcount of cluster ${cluster}`);
    this.#refcounts[cluster] = v;
  }

  /** Appends whole clusters; returns the offset of the first. */
  #allocate(clusters: number): number {
    this.#end = Math.ceil(this.#end / this.clusterBytes) * this.clusterBytes;
    const offset = this.#end;
    this.#end += clusters * this.clusterBytes;
    for (let i = 0; i < clusters; i++) this.#ref(offset / this.clusterBytes + i, 1);
    return offset;
  }

  /** Writes L2 tables, the L1 table, refcounts and the header; syncs; closes the file. */
  finish(): void {
    if (this.#finished) throw new BlksnapError("EINVAL", "qcow2: the image is finished");
    this.#finished = true;
    try {
      const cb = this.clusterBytes;
      // L2 tables, in L1 order
      const l1 = new Uint8Array(this.#l1Size * 8);
      const l1View = new DataView(l1.buffer);
      for (const index of [...this.#l2.keys()].sort((a, b) => a - b)) {
        const table = this.#l2.get(index)!;
        if (table.every((v) => v === 0)) continue;
        const bytes = new Uint8Array(cb);
        const view = new DataView(bytes.buffer);
        for (let i = 0; i < this.#l2Entries; i++) {
          view.setUint32(i * 8, table[2 * i]!);
          view.setUint32(i * 8 + 4, table[2 * i + 1]!);
        }
        const offset = this.#allocate(1);
        writeAll(this.#file, offset, bytes);
        l1View.setUint32(index * 8, (FLAG_COPIED | Math.floor(offset / TWO_32)) >>> 0);
        l1View.setUint32(index * 8 + 4, offset >>> 0);
      }
      const l1Clusters = Math.max(1, Math.ceil(l1.length / cb));
      const l1Offset = this.#allocate(l1Clusters);
      const l1Padded = new Uint8Array(l1Clusters * cb);
      l1Padded.set(l1);
      writeAll(this.#file, l1Offset, l1Padded);

      // Refcount blocks and table cover every cluster, themselves included.
      const perBlock = (cb * 8) / 2 ** REFCOUNT_ORDER;
      const used = Math.ceil(this.#end / cb);
      let blocks = 0;
      let tableClusters = 0;
      for (;;) {
        const total = used + blocks + tableClusters;
        const b = Math.ceil(total / perBlock);
        const t = Math.ceil((b * 8) / cb);
        if (b === blocks && t === tableClusters) break;
        blocks = b;
        tableClusters = t;
      }
      const blocksOffset = this.#allocate(blocks);
      const tableOffset = this.#allocate(tableClusters);
      const refTable = new Uint8Array(tableClusters * cb);
      const refTableView = new DataView(refTable.buffer);
      for (let b = 0; b < blocks; b++) {
        const block = new Uint8Array(cb);
        const view = new DataView(block.buffer);
        for (let i = 0; i < perBlock; i++) {
          const c = b * perBlock + i;
          if (c < this.#refcounts.length) view.setUint16(i * 2, this.#refcounts[c]!);
        }
        writeAll(this.#file, blocksOffset + b * cb, block);
        u64(refTableView, b * 8, blocksOffset + b * cb);
      }
      writeAll(this.#file, tableOffset, refTable);

      // The header, with the backing format extension and the backing name.
      const header = new Uint8Array(cb);
      const h = new DataView(header.buffer);
      h.setUint32(0, QCOW2_MAGIC);
      h.setUint32(4, 3);
      h.setUint32(20, this.clusterBits);
      u64(h, 24, this.sizeBytes);
      h.setUint32(32, 0); // no encryption
      h.setUint32(36, this.#l1Size);
      u64(h, 40, l1Offset);
      u64(h, 48, tableOffset);
      h.setUint32(56, tableClusters);
      h.setUint32(60, 0); // snapshots
      u64(h, 64, 0);
      // 72: incompatible, 80: compatible, 88: autoclear features: none
      h.setUint32(96, REFCOUNT_ORDER);
      h.setUint32(100, HEADER_V3_BYTES);
      let at = HEADER_V3_BYTES;
      if (this.#backing !== undefined) {
        const format = new TextEncoder().encode("qcow2");
        h.setUint32(at, EXT_BACKING_FORMAT);
        h.setUint32(at + 4, format.length);
        header.set(format, at + 8);
        at += 8 + Math.ceil(format.length / 8) * 8;
      }
      at += 8; // end of extensions: type 0, length 0
      if (this.#backing !== undefined) {
        const name = new TextEncoder().encode(this.#backing);
        u64(h, 8, at);
        h.setUint32(16, name.length);
        header.set(name, at);
      }
      writeAll(this.#file, 0, header);
      this.#file.truncateSync(this.#end);
      this.#file.syncSync();
    } finally {
      this.#file.close();
    }
  }

  /** Closes the file without finishing it (the caller removes it). */
  abort(): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#file.close();
  }
}

/** One qcow2 image opened for reading (without its backing file). */
export class Qcow2Image {
  readonly path: string;
  readonly sizeBytes: number;
  readonly clusterBits: number;
  readonly clusterBytes: number;
  readonly clusterCount: number;
  /** The backing file name as recorded (relative to this image's directory), if any. */
  readonly backingFile: string | undefined;
  readonly version: number;
  readonly #file: Deno.FsFile;
  readonly #l1: DataView;
  readonly #l2Entries: number;
  readonly #l2Cache = new Map<number, DataView>();
  readonly #fileBytes: number;

  private constructor(path: string, file: Deno.FsFile) {
    this.path = path;
    this.#file = file;
    this.#fileBytes = file.statSync().size;
    const head = new Uint8Array(4096);
    const n = readAll(file, 0, head);
    const bad = (why: string) =>
      new BlksnapError("EINVAL", `${path}: not a usable qcow2 image: ${why}`);
    if (n < 72) throw bad("shorter than a qcow2 header");
    const h = new DataView(head.buffer);
    if (h.getUint32(0) !== QCOW2_MAGIC) throw bad("no qcow2 magic");
    this.version = h.getUint32(4);
    if (this.version !== 2 && this.version !== 3) throw bad(`version ${this.version}`);
    this.clusterBits = h.getUint32(20);
    if (this.clusterBits < 9 || this.clusterBits > 21) {
      throw bad(`cluster bits ${this.clusterBits}`);
    }
    this.clusterBytes = 2 ** this.clusterBits;
    this.sizeBytes = readU64(h, 24);
    if (h.getUint32(32) !== 0) throw bad("encrypted");
    if (this.version === 3) {
      if (h.getUint32(72) !== 0 || h.getUint32(76) !== 0) throw bad("incompatible features set");
      if (h.getUint32(96) !== REFCOUNT_ORDER && h.getUint32(96) > 6) throw bad("refcount order");
    }
    this.#l2Entries = this.clusterBytes / 8;
    this.clusterCount = Math.ceil(this.sizeBytes / this.clusterBytes);
    const l1Size = h.getUint32(36);
    if (l1Size < Math.ceil(this.clusterCount / this.#l2Entries)) throw bad("L1 table too small");
    const l1Offset = readU64(h, 40);
    if (l1Offset % this.clusterBytes !== 0 || l1Offset + l1Size * 8 > this.#fileBytes) {
      throw bad(`L1 table at ${l1Offset} outside the file`);
    }
    const l1 = new Uint8Array(l1Size * 8);
    readAll(file, l1Offset, l1);
    this.#l1 = new DataView(l1.buffer);
    const backingOffset = readU64(h, 8);
    const backingBytes = h.getUint32(16);
    if (backingOffset !== 0) {
      if (
        backingBytes === 0 || backingBytes > 1023 ||
        backingOffset + backingBytes > this.clusterBytes
      ) {
        throw bad("backing file name out of range");
      }
      const name = new Uint8Array(backingBytes);
      readAll(file, backingOffset, name);
      try {
        this.backingFile = new TextDecoder("utf-8", { fatal: true }).decode(name);
      } catch {
        throw bad("backing file name is not UTF-8");
      }
    }
  }

  static open(path: string): Qcow2Image {
    const file = Deno.openSync(path, { read: true });
    try {
      return new Qcow2Image(path, file);
    } catch (err) {
      file.close();
      throw err;
    }
  }

  close(): void {
    this.#file.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #l2(l1Index: number): DataView | null {
    const hi = this.#l1.getUint32(l1Index * 8) & 0x00ff_ffff;
    const lo = this.#l1.getUint32(l1Index * 8 + 4) & 0xffff_fe00;
    const offset = hi * TWO_32 + lo;
    if (offset === 0) return null;
    let view = this.#l2Cache.get(l1Index);
    if (view === undefined) {
      if (offset % this.clusterBytes !== 0 || offset + this.clusterBytes > this.#fileBytes) {
        throw new BlksnapError(
          "EIO",
          `${this.path}: L2 table ${l1Index} at ${offset} outside the file`,
        );
      }
      const bytes = new Uint8Array(this.clusterBytes);
      readAll(this.#file, offset, bytes);
      view = new DataView(bytes.buffer);
      if (this.#l2Cache.size > 64) this.#l2Cache.clear();
      this.#l2Cache.set(l1Index, view);
    }
    return view;
  }

  /** What the L2 entry of virtual cluster `index` says. */
  kind(index: number): ClusterKind {
    const l2 = this.#l2(Math.floor(index / this.#l2Entries));
    if (l2 === null) return "unallocated";
    const at = (index % this.#l2Entries) * 8;
    const hi = l2.getUint32(at);
    const lo = l2.getUint32(at + 4);
    if (hi & FLAG_COMPRESSED) return "compressed";
    if (this.version === 3 && (lo & FLAG_ZERO)) return "zero";
    return (hi & 0x00ff_ffff) === 0 && (lo & 0xffff_fe00) === 0 ? "unallocated" : "data";
  }

  /**
   * Reads virtual cluster `index` into `into` (clusterBytes) when this image
   * holds it; returns its kind ("unallocated": `into` untouched).
   */
  readCluster(index: number, into: Uint8Array): ClusterKind {
    if (index < 0 || index >= this.clusterCount) {
      throw new BlksnapError("EINVAL", `${this.path}: cluster ${index} outside the disk`);
    }
    const kind = this.kind(index);
    if (kind === "unallocated") return kind;
    if (kind === "zero") {
      into.fill(0, 0, this.clusterBytes);
      return kind;
    }
    const l2 = this.#l2(Math.floor(index / this.#l2Entries))!;
    const at = (index % this.#l2Entries) * 8;
    const hi = l2.getUint32(at);
    const lo = l2.getUint32(at + 4);
    if (kind === "data") {
      const offset = (hi & 0x00ff_ffff) * TWO_32 + (lo & 0xffff_fe00);
      if (offset % this.clusterBytes !== 0 || offset + this.clusterBytes > this.#fileBytes) {
        throw new BlksnapError(
          "EIO",
          `${this.path}: cluster ${index} at ${offset} outside the file`,
        );
      }
      if (readAll(this.#file, offset, into.subarray(0, this.clusterBytes)) !== this.clusterBytes) {
        throw new BlksnapError("EIO", `${this.path}: short read of cluster ${index}`);
      }
      return kind;
    }
    const shift = 62 - (this.clusterBits - 8) - 32;
    const offset = (hi & ((1 << shift) - 1)) * TWO_32 + lo;
    const sectors = ((hi & 0x3fff_ffff) >>> shift) + 1;
    const start = Math.floor(offset / 512) * 512;
    const raw = new Uint8Array(sectors * 512);
    const got = readAll(this.#file, start, raw);
    const packed = raw.subarray(offset - start, got);
    let out: Uint8Array;
    try {
      out = inflateRawSync(packed, { windowBits: 12, finishFlush: 2 /* Z_SYNC_FLUSH */ });
    } catch (err) {
      throw new BlksnapError("EIO", `${this.path}: compressed cluster ${index} is corrupt`, {
        cause: err,
      });
    }
    if (out.length < this.clusterBytes) {
      throw new BlksnapError("EIO", `${this.path}: compressed cluster ${index} inflates short`);
    }
    into.set(out.subarray(0, this.clusterBytes));
    return kind;
  }
}
