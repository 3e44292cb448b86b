/**
 * The change block tracking (CBT) map of one device (the module's `cbt_map`).
 *
 * One byte per tracking block holds the number of the snapshot since whose
 * take the block changed. Writes to the tracked device set the *write map*
 * to `snapNumberActive`; taking a snapshot copies the write map to the *read
 * map* (the frozen copy that `readcbtmap` returns, still readable after the
 * snapshot is destroyed) and advances the numbers. At the take that would
 * make the active number 256, the module's `cbt_map_switch` starts a new
 * generation instead: see {@linkcode CbtMap.switch}.
 *
 * ## Shared layout
 *
 * Everything lives in one SharedArrayBuffer so that pipeline workers can map
 * it with {@linkcode CbtMap.fromShared}. Words are little-endian Int32,
 * accessed with Atomics:
 *
 * | byte | size | field                                              |
 * |-----:|-----:|----------------------------------------------------|
 * |    0 |    4 | snapNumberActive (1..255)                          |
 * |    4 |    4 | snapNumberPrevious (0..255)                        |
 * |    8 |    4 | corrupted (0 or 1)                                 |
 * |   12 |    4 | blockSizeShift (bytes, power of 2)                 |
 * |   16 |    4 | blockCount                                         |
 * |   20 |    4 | switchSequence (+1 at every take)                  |
 * |   24 |    8 | capacitySectors (Float64)                          |
 * |   32 |   16 | generation UUID (raw bytes)                        |
 * |   48 |    4 | updating: 1 while a switch or reset rewrites maps  |
 * |   52 |   12 | reserved                                           |
 * |   64 |    n | write map, n = blockCount                          |
 * | 64+m |    n | read map, m = n rounded up to 64                   |
 *
 * ## Memory outside the JavaScript heap
 *
 * The daemon may keep the map in a file it maps shared (so that it outlives
 * the daemon): {@linkcode CbtMap.overMemory}. A SharedArrayBuffer cannot
 * wrap such memory, so `shared` is then a small *descriptor* buffer (a
 * magic word, the address and the length) and {@linkcode CbtMap.fromShared}
 * in a worker of the same process views the memory by address. Atomics work
 * on it as on a SharedArrayBuffer.
 *
 * A take happens while the device's writes are quiesced (see `tracker.ts`),
 * so marks never race the copy; a worker marking the write map must do so
 * only while the tracker admits writes. A reset (device resized) makes a new
 * buffer: workers re-map when `shared` changes, which only happens at a take.
 *
 * @module
 */

import { SECTOR_SHIFT, unitOf } from "./block_device.ts";
import { assert, BlksnapError } from "./errors.ts";
import type { Params } from "./params.ts";

const HEADER_BYTES = 64;
const W_ACTIVE = 0;
const W_PREVIOUS = 1;
const W_CORRUPTED = 2;
const W_SHIFT = 3;
const W_COUNT = 4;
const W_SEQUENCE = 5;
const CAPACITY_OFFSET = 24;
const UUID_OFFSET = 32;
const W_UPDATING = 12;
/** Word 0 of a descriptor buffer; never a valid snapNumberActive (1..255). */
const DESCRIPTOR_MAGIC = 0x4d544243; // "CBTM"
const DESCRIPTOR_BYTES = 64;

/** What `cbtinfo` reports (`struct blksnap_cbtinfo`). */
export interface CbtInfo {
  readonly deviceCapacityBytes: number;
  readonly blockSizeBytes: number;
  readonly blockCount: number;
  readonly generationId: string;
  /** `snapNumberPrevious`: the number of the last take. */
  readonly changesNumber: number;
}

/** The tracking block size the module would choose for a device. */
export interface CbtGeometry {
  readonly blockSizeShift: number;
  readonly blockCount: number;
}

/**
 * Chooses the tracking block size as `cbt_map_calculate_block_size` does:
 * start at the minimum shift and grow until the count is at most
 * `trackingBlockMaximumCount`, never past `trackingBlockMaximumShift`.
 */
export function cbtGeometry(capacitySectors: number, params: Params): CbtGeometry {
  assert(Number.isSafeInteger(capacitySectors) && capacitySectors >= 0, "Bad capacity");
  let shift = params.trackingBlockMinimumShift;
  let count = countByShift(capacitySectors, shift);
  while (count > params.trackingBlockMaximumCount) {
    if (shift >= params.trackingBlockMaximumShift) break;
    shift++;
    count = countByShift(capacitySectors, shift);
  }
  return { blockSizeShift: shift, blockCount: count };
}

function countByShift(capacitySectors: number, shift: number): number {
  const blockSectors = 2 ** (shift - SECTOR_SHIFT);
  return Math.ceil(capacitySectors / blockSectors);
}

function isWellFormed(sector: number, count: number): boolean {
  return Number.isSafeInteger(sector) && Number.isSafeInteger(count) && sector >= 0 && count >= 0;
}

function align64(n: number): number {
  return Math.ceil(n / 64) * 64;
}

/** Parses a UUID string into 16 bytes. */
export function uuidToBytes(uuid: string, out: Uint8Array = new Uint8Array(16)): Uint8Array {
  const hex = uuid.replaceAll("-", "");
  assert(/^[0-9a-fA-F]{32}$/.test(hex), `Bad UUID "${uuid}"`);
  for (let i = 0; i < 16; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

/** Formats 16 bytes as a UUID string. */
export function uuidFromBytes(bytes: Uint8Array): string {
  assert(bytes.length === 16, "A UUID is 16 bytes");
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${
    hex.slice(20)
  }`;
}

/** Bytes of a map of `blockCount` blocks (the size of a file that holds one). */
export function cbtMapBytes(blockCount: number): number {
  return HEADER_BYTES + align64(blockCount) * 2;
}

/** The CBT map of one device. */
export class CbtMap {
  #shared!: SharedArrayBuffer;
  #memory!: ArrayBufferLike;
  #words!: Int32Array;
  #capacity!: Float64Array;
  #uuid!: Uint8Array;
  #writeMap!: Uint8Array;
  #readMap!: Uint8Array;
  /** log2 of sectors per block. */
  #sectorShift = 0;
  /** capacitySectors as a plain number (an integer compare on every write, not a Float64Array load). */
  #capacitySectors = 0;

  /** `memory` holds the map when it is outside the heap; `shared` then describes it. */
  private constructor(shared: SharedArrayBuffer, memory: ArrayBufferLike = shared) {
    this.#view(shared, memory);
  }

  /** Makes the map of a device of `capacitySectors`, numbers 1 (active) and 0 (previous). */
  static create(capacitySectors: number, params: Params): CbtMap {
    return new CbtMap(CbtMap.#allocate(capacitySectors, params));
  }

  /** Maps a buffer made by another instance (for example in a worker). */
  static fromShared(shared: SharedArrayBuffer): CbtMap {
    assert(shared.byteLength >= HEADER_BYTES, "CBT buffer too small");
    const d = new Int32Array(shared, 0, 1);
    if (Atomics.load(d, 0) !== DESCRIPTOR_MAGIC) return new CbtMap(shared);
    const f = new Float64Array(shared, 8, 2);
    const ptr = Deno.UnsafePointer.create(BigInt(f[0]!));
    assert(ptr !== null, "CBT descriptor without an address");
    return new CbtMap(shared, Deno.UnsafePointerView.getArrayBuffer(ptr, f[1]!));
  }

  /**
   * A map in memory outside the heap (a file mapped shared by the caller,
   * who keeps it mapped as long as any view lives). With `fresh` the header
   * and both maps are initialised for `capacitySectors` with a new
   * generation; without it the memory must already hold a map of exactly
   * that geometry (see {@linkcode CbtMap.check}).
   */
  static overMemory(
    address: number,
    byteLength: number,
    geometry: { capacitySectors: number; params: Params; fresh: boolean },
  ): CbtMap {
    const ptr = Deno.UnsafePointer.create(BigInt(address));
    assert(ptr !== null, "CBT memory at address 0");
    const memory = Deno.UnsafePointerView.getArrayBuffer(ptr, byteLength);
    const { blockSizeShift, blockCount } = cbtGeometry(geometry.capacitySectors, geometry.params);
    assert(byteLength === cbtMapBytes(blockCount), "CBT memory of the wrong size");
    if (geometry.fresh) {
      new Uint8Array(memory).fill(0);
      CbtMap.#initHeader(memory, geometry.capacitySectors, blockSizeShift, blockCount);
    }
    const descriptor = new SharedArrayBuffer(DESCRIPTOR_BYTES);
    const f = new Float64Array(descriptor, 8, 2);
    f[0] = address;
    f[1] = byteLength;
    Atomics.store(new Int32Array(descriptor, 0, 1), 0, DESCRIPTOR_MAGIC);
    return new CbtMap(descriptor, memory);
  }

  /**
   * Why the memory does not hold a usable map of this geometry (a daemon
   * killed in the middle of a switch, another device's map, garbage), or
   * null when it does.
   */
  static check(
    memory: ArrayBuffer,
    geometry: { capacitySectors: number; params: Params },
  ): string | null {
    const { blockSizeShift, blockCount } = cbtGeometry(geometry.capacitySectors, geometry.params);
    if (memory.byteLength !== cbtMapBytes(blockCount)) return "its size does not match the device";
    const w = new Int32Array(memory, 0, HEADER_BYTES / 4);
    if (w[W_SHIFT] !== blockSizeShift || w[W_COUNT] !== blockCount) {
      return "its block size or count does not match the device";
    }
    if (new Float64Array(memory, CAPACITY_OFFSET, 1)[0] !== geometry.capacitySectors) {
      return "its capacity does not match the device";
    }
    if (
      !(w[W_ACTIVE]! >= 1 && w[W_ACTIVE]! <= 255 && w[W_PREVIOUS]! >= 0 && w[W_PREVIOUS]! <= 255)
    ) {
      return "its snapshot numbers are out of range";
    }
    if (w[W_UPDATING] !== 0) return "a switch or reset of it was cut short";
    return null;
  }

  static #allocate(capacitySectors: number, params: Params): SharedArrayBuffer {
    const { blockSizeShift, blockCount } = cbtGeometry(capacitySectors, params);
    const shared = new SharedArrayBuffer(cbtMapBytes(blockCount));
    CbtMap.#initHeader(shared, capacitySectors, blockSizeShift, blockCount);
    return shared;
  }

  static #initHeader(
    memory: ArrayBufferLike,
    capacitySectors: number,
    blockSizeShift: number,
    blockCount: number,
  ): void {
    const words = new Int32Array(memory, 0, HEADER_BYTES / 4);
    words[W_ACTIVE] = 1;
    words[W_PREVIOUS] = 0;
    words[W_CORRUPTED] = 0;
    words[W_SHIFT] = blockSizeShift;
    words[W_COUNT] = blockCount;
    words[W_SEQUENCE] = 0;
    words[W_UPDATING] = 0;
    new Float64Array(memory, CAPACITY_OFFSET, 1)[0] = capacitySectors;
    uuidToBytes(crypto.randomUUID(), new Uint8Array(memory, UUID_OFFSET, 16));
  }

  #map(shared: SharedArrayBuffer): void {
    this.#view(shared, shared);
  }

  /** `shared` goes to workers; `memory` holds the map (the same buffer unless out of the heap). */
  #view(shared: SharedArrayBuffer, memory: ArrayBufferLike): void {
    this.#shared = shared;
    this.#memory = memory;
    this.#words = new Int32Array(memory, 0, HEADER_BYTES / 4);
    this.#capacity = new Float64Array(memory, CAPACITY_OFFSET, 1);
    this.#uuid = new Uint8Array(memory, UUID_OFFSET, 16);
    const count = this.#words[W_COUNT]!;
    assert(memory.byteLength === cbtMapBytes(count), "CBT buffer size mismatch");
    this.#writeMap = new Uint8Array(memory, HEADER_BYTES, count);
    this.#readMap = new Uint8Array(memory, HEADER_BYTES + align64(count), count);
    this.#sectorShift = this.#words[W_SHIFT]! - SECTOR_SHIFT;
    this.#capacitySectors = this.#capacity[0]!;
  }

  /** The buffer to hand to workers; replaced only by {@linkcode reset}. */
  get shared(): SharedArrayBuffer {
    return this.#shared;
  }
  get snapNumberActive(): number {
    return Atomics.load(this.#words, W_ACTIVE);
  }
  get snapNumberPrevious(): number {
    return Atomics.load(this.#words, W_PREVIOUS);
  }
  get isCorrupted(): boolean {
    return Atomics.load(this.#words, W_CORRUPTED) !== 0;
  }
  get blockSizeShift(): number {
    return this.#words[W_SHIFT]!;
  }
  get blockSizeBytes(): number {
    return 2 ** this.blockSizeShift;
  }
  get blockCount(): number {
    return this.#words[W_COUNT]!;
  }
  get capacitySectors(): number {
    return this.#capacity[0]!;
  }
  get generationId(): string {
    return uuidFromBytes(this.#uuid.slice());
  }
  /** Number of takes so far, for workers to notice a switch. */
  get switchSequence(): number {
    return Atomics.load(this.#words, W_SEQUENCE);
  }
  /** Bytes of memory held by the map. */
  get byteLength(): number {
    return this.#memory.byteLength;
  }

  /** A live view of the write map (tests and workers). */
  get writeMap(): Uint8Array {
    return this.#writeMap;
  }
  /** A live view of the read map (tests and workers). */
  get readMap(): Uint8Array {
    return this.#readMap;
  }

  /** Marks the flag that the map is no longer reliable; the next take resets it. */
  setCorrupted(): void {
    Atomics.store(this.#words, W_CORRUPTED, 1);
  }

  /**
   * `cbt_map_set`: a write to the device changed `[sector, sector + count)`.
   * A corrupted map is no longer maintained. A range past the end of the map
   * (the device grew since the map was made) corrupts the map, as the module
   * does; it never fails the write, and the next take resets the map. A
   * malformed range (negative, fractional) is EINVAL.
   */
  mark(sector: number, count: number): void {
    if (this.isCorrupted || count === 0) return;
    if (!isWellFormed(sector, count)) throw this.#outside(sector, count);
    if (sector + count > this.#capacitySectors) {
      this.setCorrupted();
      return;
    }
    this.#set(this.#writeMap, sector, count, this.snapNumberActive);
  }

  /**
   * `cbt_map_set_both`: marks both maps, for writes to a snapshot image and
   * for `markdirtyblock`, so that the next backup rereads these blocks: the
   * write map with the active number, the read map with the previous one.
   * EINVAL when the map is corrupted or the range is past its end (the map
   * is left as it is, as the module does).
   */
  markBoth(sector: number, count: number): void {
    if (this.isCorrupted) throw new BlksnapError("EINVAL", "The CBT map is corrupted");
    if (count === 0) return;
    this.#checkRange(sector, count);
    this.#set(this.#writeMap, sector, count, this.snapNumberActive);
    this.#set(this.#readMap, sector, count, this.snapNumberPrevious);
  }

  /**
   * `cbt_map_switch`, at a take: previous takes the active number and active
   * advances, and the read map becomes a copy of the write map.
   *
   * At the take that would make active 256 the module (and so this) starts
   * a new generation: previous becomes 255, active 1, the write map is
   * zeroed and a new generation UUID is made — and the read map is *not*
   * refreshed: it keeps the previous take's content, so the changes made
   * since that take are missing from it. That is the module's behaviour,
   * kept for compatibility; a backup tool sees the new generation id and
   * must take a full backup. Marks of both maps after it (`markBoth`) set
   * the read map to 255, the previous number.
   */
  switch(): void {
    const active = this.snapNumberActive;
    assert(active >= 1 && active <= 255, `Bad active snapshot number ${active}`);
    // A map that outlives its process tells a switch cut short from a finished one.
    Atomics.store(this.#words, W_UPDATING, 1);
    Atomics.store(this.#words, W_PREVIOUS, active);
    if (active === 255) {
      this.#writeMap.fill(0);
      uuidToBytes(crypto.randomUUID(), this.#uuid);
      Atomics.store(this.#words, W_ACTIVE, 1);
    } else {
      this.#readMap.set(this.#writeMap);
      Atomics.store(this.#words, W_ACTIVE, active + 1);
    }
    Atomics.add(this.#words, W_SEQUENCE, 1);
    Atomics.store(this.#words, W_UPDATING, 0);
  }

  /**
   * `cbt_map_reset`: the device was resized or the map is corrupted; a new
   * map for `capacitySectors`, numbers restarted and a new generation.
   */
  reset(capacitySectors: number, params: Params): void {
    const sequence = this.switchSequence;
    this.#map(CbtMap.#allocate(capacitySectors, params));
    Atomics.store(this.#words, W_SEQUENCE, sequence);
  }

  /**
   * `cbt_map_reset` for a device whose size did not change, in the same
   * buffer (workers keep their views): both maps zeroed, numbers restarted,
   * a new generation. Only while no write marks the map (the take's gate).
   */
  resetInPlace(): void {
    Atomics.store(this.#words, W_UPDATING, 1);
    this.#writeMap.fill(0);
    this.#readMap.fill(0);
    Atomics.store(this.#words, W_ACTIVE, 1);
    Atomics.store(this.#words, W_PREVIOUS, 0);
    uuidToBytes(crypto.randomUUID(), this.#uuid);
    Atomics.store(this.#words, W_CORRUPTED, 0);
    Atomics.store(this.#words, W_UPDATING, 0);
  }

  /**
   * `BLKFILTER_CTL_BLKSNAP_CBTMAP`: copies `length` bytes of the read map
   * from byte `offset`. EFAULT when the map is corrupted, ENODATA past its end.
   */
  read(offset: number, length: number): Uint8Array {
    if (this.isCorrupted) throw new BlksnapError("EFAULT", "The CBT map is corrupted");
    if (
      !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 ||
      length < 0 || offset > this.blockCount || length > this.blockCount - offset
    ) {
      throw new BlksnapError(
        "ENODATA",
        `Cannot read ${length} bytes at ${offset} of a CBT map of ${this.blockCount} blocks`,
      );
    }
    return this.#readMap.slice(offset, offset + length);
  }

  /** `BLKFILTER_CTL_BLKSNAP_CBTINFO`. */
  info(): CbtInfo {
    return {
      deviceCapacityBytes: this.capacitySectors * 2 ** SECTOR_SHIFT,
      blockSizeBytes: this.blockSizeBytes,
      blockCount: this.blockCount,
      generationId: this.generationId,
      changesNumber: this.snapNumberPrevious,
    };
  }

  #checkRange(sector: number, count: number): void {
    if (!isWellFormed(sector, count) || sector + count > this.capacitySectors) {
      throw this.#outside(sector, count);
    }
  }

  #outside(sector: number, count: number): BlksnapError {
    return new BlksnapError(
      "EINVAL",
      `Sector range ${sector}+${count} is outside the CBT map of ${this.capacitySectors} sectors`,
    );
  }

  #set(map: Uint8Array, sector: number, count: number, number: number): void {
    const first = unitOf(sector, this.#sectorShift);
    const last = unitOf(sector + count - 1, this.#sectorShift);
    // The message is built only on failure: as an argument of assert() it
    // would be allocated on every write.
    if (last >= map.length) assert(false, `CBT block ${last} past the map of ${map.length}`);
    for (let i = first; i <= last; i++) {
      if (map[i]! < number) map[i] = number;
    }
  }
}
