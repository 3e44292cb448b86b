/**
 * The snapshot engine of blksnap, in pure TypeScript: CBT maps, chunks and
 * copy-on-write, the difference storage, snapshots and their events, over an
 * abstract {@linkcode BlockDevice}.
 *
 * ```ts
 * const params = makeParams();
 * const tracker = new Tracker({ device, params });
 * const snapshots = new Snapshots({ params });
 * const id = await snapshots.create({ diffStoragePath: "/var/tmp", limitSectors: 2 ** 21 });
 * await snapshots.addDevice(id, tracker);
 * await snapshots.take(id);
 * await tracker.write(0, data);          // the original changes…
 * await tracker.readImage(0, old);       // …the image does not
 * await snapshots.destroy(id);
 * ```
 *
 * @module
 */

export {
  assertSectorBuffer,
  assertSectorRange,
  type BlockDevice,
  type IoHooks,
  type IoKind,
  type IoRequest,
  SECTOR_SHIFT,
  SECTOR_SIZE,
} from "./block_device.ts";
export {
  type CbtGeometry,
  cbtGeometry,
  type CbtInfo,
  CbtMap,
  uuidFromBytes,
  uuidToBytes,
} from "./cbt_map.ts";
export {
  type ChunkGeometry,
  chunkGeometry,
  chunkHash,
  ChunkState,
  chunkStateName,
  ChunkTable,
  type ChunkTableOptions,
  isLegalTransition,
  MAXIMUM_RECORDS,
  SEGMENT_SLOTS,
} from "./chunk.ts";
export {
  DiffArea,
  type DiffAreaOptions,
  type DiffAreaStats,
  STORE_CONCURRENCY,
} from "./diff_area.ts";
export { DiffBufferPool, type DiffBufferPoolOptions } from "./diff_buffer.ts";
export {
  DiffStorage,
  type DiffStorageFile,
  type DiffStorageKind,
  type DiffStorageOpener,
  type DiffStorageOptions,
  type NativeDiffStorageOptions,
  openDiffStorageFile,
} from "./diff_storage.ts";
export {
  assert,
  AssertionError,
  BlksnapError,
  ERRNO,
  type ErrnoName,
  errnoName,
  toBlksnapError,
} from "./errors.ts";
export {
  type CorruptedEvent,
  EVENT_CODES,
  EVENT_QUEUE_CAPACITY,
  EventQueue,
  type NoSpaceEvent,
  type SnapshotEvent,
} from "./event_queue.ts";
export { FileDevice, type FileDeviceOptions, type FileDeviceStats } from "./file_device.ts";
export {
  DEFAULT_PARAMS,
  makeParams,
  PARAM_SPECS,
  type Params,
  type ParamSpec,
  type ResolvedParams,
  resolveParams,
} from "./params.ts";
export {
  type CreateOptions,
  Snapshots,
  type SnapshotsOptions,
  type TakeHooks,
} from "./snapshot.ts";
export { type SectorRange, type SnapshotInfo, Tracker, type TrackerOptions } from "./tracker.ts";
