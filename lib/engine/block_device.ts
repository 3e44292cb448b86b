/**
 * The abstract block device the engine works on.
 *
 * The ublk targets implement it over io_uring; tests implement it over files
 * (`file_device.ts`). Addresses are 512-byte sectors held in JS numbers, which
 * is exact up to 2^53 bytes; {@linkcode assertSectorRange} checks it.
 *
 * @module
 */

import { assert } from "./errors.ts";

export const SECTOR_SHIFT = 9;

/**
 * The index of the 2^`shift`-sector unit (a CBT block, a chunk) that holds
 * `sector`. On every write, so integer shifts while the sector is below 2^31
 * (1 TiB) and a division past it, never Math.pow (a library call, and a long
 * soft-float routine under emulation). `shift` is below 31.
 */
export function unitOf(sector: number, shift: number): number {
  return sector <= 0x7fff_ffff ? sector >>> shift : Math.floor(sector / (1 << shift));
}
export const SECTOR_SIZE = 512;
/** Largest byte offset the engine addresses (exact in a JS number). */
export const MAX_BYTES = Number.MAX_SAFE_INTEGER;

/**
 * A block device: async, sector-addressed, caller-owned buffers.
 *
 * Operations may run concurrently and complete in any order, like requests
 * in a block queue. A write is complete when its promise resolves.
 */
export interface BlockDevice {
  /** Capacity in 512-byte sectors. */
  readonly sizeSectors: number;
  /** Logical block size in bytes (a multiple of 512); I/O is aligned to it by the caller. */
  readonly logicalBlockSize: number;
  /**
   * Minimum I/O size in bytes (`bdev_io_min`: usually the physical block
   * size, or a RAID chunk); a chunk is never smaller. Default: `logicalBlockSize`.
   */
  readonly minIoBytes?: number;
  /**
   * Identity of the device, "MAJ:MIN" for real devices, any unique string for
   * stand-ins. It tells whether the difference storage lives on this device.
   */
  readonly deviceId: string;
  /** Reads `buf.length` bytes (a multiple of 512) at `sector`. */
  read(sector: number, buf: Uint8Array): Promise<void>;
  /** Writes `buf` (a multiple of 512 bytes) at `sector`. */
  write(sector: number, buf: Uint8Array): Promise<void>;
  /** Makes completed writes durable. */
  flush(): Promise<void>;
  /** Discards `count` sectors at `sector`; their content is undefined afterwards. */
  discard(sector: number, count: number): Promise<void>;
}

/** Kinds of I/O seen by {@linkcode IoHooks}. */
export type IoKind = "read" | "write" | "flush" | "discard" | "allocate";

/** One I/O about to be performed, as shown to {@linkcode IoHooks}. */
export interface IoRequest {
  readonly kind: IoKind;
  readonly offsetBytes: number;
  readonly lengthBytes: number;
}

/**
 * Fault injection and delays for the stand-ins. `before` runs before every
 * I/O (or piece of one, see `FileDeviceOptions.pieceSectors`): it may await
 * (to vary interleavings) or throw (to inject a fault, for example
 * `new BlksnapError("EIO", …)`); a throw fails that I/O. `after` runs once
 * the data has moved and before the I/O completes, so that other I/O
 * overtakes it; a throw fails the I/O although the data has moved.
 */
export interface IoHooks {
  before?(request: IoRequest): void | Promise<void>;
  after?(request: IoRequest): void | Promise<void>;
}

/** Asserts that `[sector, sector + count)` is a valid sector range within `sizeSectors`. */
export function assertSectorRange(sector: number, count: number, sizeSectors: number): void {
  assert(Number.isSafeInteger(sector) && sector >= 0, `Bad sector ${sector}`);
  assert(Number.isSafeInteger(count) && count >= 0, `Bad sector count ${count}`);
  assert(
    (sector + count) * SECTOR_SIZE <= MAX_BYTES,
    `Sector range ${sector}+${count} is past 2^53 bytes`,
  );
  assert(
    sector + count <= sizeSectors,
    `Sector range ${sector}+${count} is past the device end ${sizeSectors}`,
  );
}

/** Asserts that a buffer is a whole number of sectors. */
export function assertSectorBuffer(buf: Uint8Array): void {
  assert(buf.length % SECTOR_SIZE === 0, `Buffer of ${buf.length} bytes is not whole sectors`);
}
