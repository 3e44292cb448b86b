/**
 * The module parameters of blksnap (the kernel module's names and defaults;
 * `blksnap daemon --help` lists them), one typed object.
 *
 * Each parameter is also a daemon option: {@linkcode PARAM_SPECS} maps the
 * kernel's name (`diff_storage_minimum`) to the key of {@linkcode Params}.
 *
 * @module
 */

import { BlksnapError } from "./errors.ts";

/** The engine's tunables, with the kernel module's meaning. */
export interface Params {
  /** Power of 2 of the smallest CBT block (16 = 64 KiB). */
  readonly trackingBlockMinimumShift: number;
  /** The CBT block grows until the map has at most this many blocks. */
  readonly trackingBlockMaximumCount: number;
  /** Power of 2 of the largest CBT block; past it the count may exceed the maximum. */
  readonly trackingBlockMaximumShift: number;
  /** Power of 2 of the smallest chunk (18 = 256 KiB). */
  readonly chunkMinimumShift: number;
  /** Power of 2 of the largest number of chunks of one device. */
  readonly chunkMaximumCountShift: number;
  /** Power of 2 of the largest chunk. */
  readonly chunkMaximumShift: number;
  /** Most chunks waiting in a device's store queue; more makes writers wait. */
  readonly chunkMaximumInQueue: number;
  /** Most chunk buffers of a device held in memory; more makes writers wait. */
  readonly freeDiffBufferPoolSize: number;
  /** Portion by which the difference storage file grows, in sectors. */
  readonly diffStorageMinimumSectors: number;
  /**
   * The copy-on-write watchdog (not a module parameter: the kernel has no
   * bound either). The buffer pool, the store queue and an allocation that
   * waits for the difference storage to grow are hard throttles, so a hung
   * difference storage would stall writes to the original for ever
   * (invariant 3). When writers have waited for room, or an allocation has
   * waited for a growth, this long with no progress at all (no chunk stored,
   * no growth finished), the snapshot is marked corrupted — -EIO for stuck
   * stores, -ENOSPC for a stuck growth — which releases every waiter and
   * lets writes through. Memory stays bounded; the snapshot is lost instead.
   */
  readonly cowStallTimeoutMs: number;
}

/** The kernel module's defaults. */
export const DEFAULT_PARAMS: Params = Object.freeze({
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

/** A parameter's kernel name, its key in {@linkcode Params} and its bounds. */
export interface ParamSpec {
  readonly name: string;
  readonly key: keyof Params;
  readonly minimum: number;
  readonly maximum: number;
  readonly description: string;
}

/** Every parameter, in the kernel module's order, then the engine's own. */
export const PARAM_SPECS: readonly ParamSpec[] = Object.freeze([
  {
    name: "tracking_block_minimum_shift",
    key: "trackingBlockMinimumShift",
    minimum: 9,
    maximum: 40,
    description: "The power of 2 for minimum tracking block size",
  },
  {
    name: "tracking_block_maximum_count",
    key: "trackingBlockMaximumCount",
    minimum: 1,
    maximum: 2 ** 31 - 1,
    description: "The maximum number of tracking blocks",
  },
  {
    name: "tracking_block_maximum_shift",
    key: "trackingBlockMaximumShift",
    minimum: 9,
    maximum: 40,
    description: "The power of 2 for maximum trackings block size",
  },
  {
    name: "chunk_minimum_shift",
    key: "chunkMinimumShift",
    minimum: 9,
    maximum: 30,
    description: "The power of 2 for minimum chunk size",
  },
  {
    name: "chunk_maximum_count_shift",
    key: "chunkMaximumCountShift",
    minimum: 1,
    maximum: 44,
    description: "The power of 2 for maximum number of chunks",
  },
  {
    name: "chunk_maximum_shift",
    key: "chunkMaximumShift",
    minimum: 9,
    maximum: 30,
    description: "The power of 2 for maximum snapshots chunk size",
  },
  {
    name: "chunk_maximum_in_queue",
    key: "chunkMaximumInQueue",
    minimum: 1,
    maximum: 65536,
    description: "The maximum number of chunks in store queue",
  },
  {
    name: "free_diff_buffer_pool_size",
    key: "freeDiffBufferPoolSize",
    minimum: 1,
    maximum: 65536,
    description: "The size of the pool of preallocated difference buffers",
  },
  {
    name: "diff_storage_minimum",
    key: "diffStorageMinimumSectors",
    minimum: 1,
    maximum: 2 ** 40,
    description: "The minimum allowable size of the difference storage in sectors",
  },
  {
    name: "cow_stall_timeout_ms",
    key: "cowStallTimeoutMs",
    minimum: 1,
    maximum: 2 ** 31 - 1,
    description:
      "Milliseconds writers may wait for room, or an allocation for a growth, with no progress before the snapshot is corrupted",
  },
]);

/** The outcome of {@linkcode resolveParams}: the parameters and what was fixed. */
export interface ResolvedParams {
  readonly params: Params;
  /** One line per value adjusted the way the module's `parameters_init` does. */
  readonly warnings: readonly string[];
}

/**
 * Validates overrides against {@linkcode PARAM_SPECS} and applies the
 * module's own corrections (`parameters_init`): a maximum shift below its
 * minimum is raised, `diff_storage_minimum` is at least two minimal chunks
 * and a multiple of one. Out-of-range or non-integer values are EINVAL.
 *
 * Unlike the module, the chunk may be smaller than a page (down to one
 * sector): userspace buffers are not made of pages, and tests want tiny chunks.
 */
export function resolveParams(overrides: Partial<Params> = {}): ResolvedParams {
  const values: Record<keyof Params, number> = { ...DEFAULT_PARAMS };
  for (const spec of PARAM_SPECS) {
    const value = overrides[spec.key];
    if (value === undefined) continue;
    if (!Number.isSafeInteger(value) || value < spec.minimum || value > spec.maximum) {
      throw new BlksnapError(
        "EINVAL",
        `Invalid ${spec.name}=${value}: expected an integer from ${spec.minimum} to ${spec.maximum}`,
      );
    }
    values[spec.key] = value;
  }
  const warnings: string[] = [];
  if (values.trackingBlockMaximumShift < values.trackingBlockMinimumShift) {
    values.trackingBlockMaximumShift = values.trackingBlockMinimumShift;
    warnings.push(`fixed tracking_block_maximum_shift: ${values.trackingBlockMaximumShift}`);
  }
  if (values.chunkMaximumShift < values.chunkMinimumShift) {
    values.chunkMaximumShift = values.chunkMinimumShift;
    warnings.push(`fixed chunk_maximum_shift: ${values.chunkMaximumShift}`);
  }
  const chunkMinimumSectors = 2 ** (values.chunkMinimumShift - 9);
  if (values.diffStorageMinimumSectors < chunkMinimumSectors * 2) {
    values.diffStorageMinimumSectors = chunkMinimumSectors * 2;
    warnings.push(`fixed diff_storage_minimum: ${values.diffStorageMinimumSectors}`);
  }
  if (values.diffStorageMinimumSectors % chunkMinimumSectors !== 0) {
    values.diffStorageMinimumSectors -= values.diffStorageMinimumSectors % chunkMinimumSectors;
    warnings.push(`fixed diff_storage_minimum: ${values.diffStorageMinimumSectors}`);
  }
  return { params: Object.freeze(values), warnings };
}

/** Shorthand for `resolveParams(overrides).params`. */
export function makeParams(overrides: Partial<Params> = {}): Params {
  return resolveParams(overrides).params;
}
