/**
 * The difference storage of a snapshot (the module's `diff_storage`): where
 * the old content of overwritten chunks goes, shared by every device of the
 * snapshot.
 *
 * It is a regular file (opened exclusively), a directory (an unnamed file is
 * made in it and disappears with the snapshot) or a block device (no
 * growth). Space is handed out in chunk-sized extents from the start. A file
 * grows by `diff_storage_minimum` sectors whenever the free space falls to
 * half of that, never past the limit; when it cannot grow a `no_space` event
 * is raised, and when an extent cannot be had the caller marks the snapshot
 * corrupted with ENOSPC. Extents are handed out up to the size requested
 * (capacity plus the growth under way), as the module does; a request that
 * does not fit while the file is growing waits for the growth rather than
 * overflowing, which the module would do. That wait is bounded: when a
 * growth has made no progress for `cow_stall_timeout_ms` while an
 * allocation waits for it, the storage gives up on it — it overflows, a
 * `no_space` event is raised, and the waiting allocations get -1, so the
 * snapshot is corrupted with ENOSPC instead of stalling copy-on-write.
 *
 * The `log` and `onEvent` callbacks are isolated: one that throws is
 * reported to the other (or dropped) and never fails an allocation.
 *
 * The file I/O is behind {@linkcode DiffStorageFile}, opened by an injectable
 * {@linkcode DiffStorageOpener}. {@linkcode openDiffStorageFile} is the
 * native one, built on Deno.FsFile: it grows files with `truncate` (Deno has
 * no fallocate without FFI; pass `fallocate` to plug one in), takes an
 * exclusive `flock` on regular files in place of O_EXCL, and for a directory
 * makes a uniquely named file and unlinks it right after opening. The FFI
 * opener will use O_TMPFILE and O_EXCL instead.
 *
 * @module
 */

import { Watchdog } from "./watchdog.ts";
import { type IoHooks, type IoRequest, SECTOR_SIZE } from "./block_device.ts";
import { devTKey } from "../dev_t.ts";
import { assert, BlksnapError, toBlksnapError } from "./errors.ts";
import type { SnapshotEvent } from "./event_queue.ts";
import { preadSync, pwriteSync } from "./file_device.ts";
import type { Params } from "./params.ts";

/** What kind of object holds the difference storage. */
export type DiffStorageKind = "file" | "tmpfile" | "blockdev";

/** Byte-addressed I/O on the object that holds the difference storage. */
export interface DiffStorageFile {
  readonly kind: DiffStorageKind;
  /** The path given by the user. */
  readonly path: string;
  /** The device that holds the storage ("MAJ:MIN"): it cannot join the snapshot. */
  readonly deviceId: string;
  /** Current size in bytes. */
  readonly sizeBytes: number;
  read(offsetBytes: number, buf: Uint8Array): Promise<void>;
  write(offsetBytes: number, buf: Uint8Array): Promise<void>;
  /** Grows the storage to at least `lengthBytes` (fallocate); never shrinks it. */
  allocate(lengthBytes: number): Promise<void>;
  /** Closes it; an unnamed file disappears. */
  close(): Promise<void>;
}

/** Opens the difference storage at a path. */
export type DiffStorageOpener = (path: string) => Promise<DiffStorageFile>;

/** Options of {@linkcode openDiffStorageFile}. */
export interface NativeDiffStorageOptions {
  /** Delays and faults (the `allocate` kind is a growth). */
  readonly hooks?: IoHooks;
  /** A real fallocate, e.g. through FFI; default: `truncate`. */
  readonly fallocate?: (file: Deno.FsFile, lengthBytes: number) => Promise<void>;
}

/**
 * The native opener: ENOENT for a missing path, EINVAL for anything but a
 * regular file, a directory or a block device, EBUSY for a file another
 * holder has locked.
 */
export async function openDiffStorageFile(
  path: string,
  options: NativeDiffStorageOptions = {},
): Promise<DiffStorageFile> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (error) {
    throw toBlksnapError(error, `Cannot open the difference storage "${path}"`);
  }
  if (info.isBlockDevice === true) {
    const file = await openOrThrow(path, { read: true, write: true });
    const sizeBytes = file.seekSync(0, Deno.SeekMode.End);
    return new NativeDiffStorageFile({
      kind: "blockdev",
      path,
      file,
      deviceId: devTKey(info.rdev ?? 0),
      sizeBytes,
      options,
    });
  }
  if (info.isDirectory) {
    const name = `${path.replace(/\/+$/, "")}/.blksnap-diff-${crypto.randomUUID()}`;
    const file = await openOrThrow(name, { read: true, write: true, createNew: true, mode: 0o600 });
    try {
      await Deno.remove(name);
    } catch (error) {
      file.close();
      throw toBlksnapError(error, `Cannot unlink "${name}"`);
    }
    return new NativeDiffStorageFile({
      kind: "tmpfile",
      path,
      file,
      deviceId: devTKey(info.dev),
      sizeBytes: 0,
      options,
    });
  }
  if (info.isFile) {
    const file = await openOrThrow(path, { read: true, write: true });
    if (!file.tryLockSync(true)) {
      file.close();
      throw new BlksnapError("EBUSY", `The difference storage "${path}" is in use`);
    }
    return new NativeDiffStorageFile({
      kind: "file",
      path,
      file,
      deviceId: devTKey(info.dev),
      sizeBytes: info.size,
      options,
    });
  }
  throw new BlksnapError(
    "EINVAL",
    `The difference storage "${path}" should be a block device, directory or regular file`,
  );
}

async function openOrThrow(path: string, options: Deno.OpenOptions): Promise<Deno.FsFile> {
  try {
    return await Deno.open(path, options);
  } catch (error) {
    throw toBlksnapError(error, `Cannot open the difference storage "${path}"`);
  }
}

class NativeDiffStorageFile implements DiffStorageFile {
  readonly kind: DiffStorageKind;
  readonly path: string;
  readonly deviceId: string;
  #sizeBytes: number;
  #file: Deno.FsFile | null;
  readonly #options: NativeDiffStorageOptions;

  constructor(init: {
    kind: DiffStorageKind;
    path: string;
    file: Deno.FsFile;
    deviceId: string;
    sizeBytes: number;
    options: NativeDiffStorageOptions;
  }) {
    this.kind = init.kind;
    this.path = init.path;
    this.deviceId = init.deviceId;
    this.#sizeBytes = init.sizeBytes;
    this.#file = init.file;
    this.#options = init.options;
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  async read(offsetBytes: number, buf: Uint8Array): Promise<void> {
    await this.#before({ kind: "read", offsetBytes, lengthBytes: buf.length });
    preadSync(this.#open(), buf, offsetBytes);
  }

  async write(offsetBytes: number, buf: Uint8Array): Promise<void> {
    await this.#before({ kind: "write", offsetBytes, lengthBytes: buf.length });
    pwriteSync(this.#open(), buf, offsetBytes);
    this.#sizeBytes = Math.max(this.#sizeBytes, offsetBytes + buf.length);
  }

  async allocate(lengthBytes: number): Promise<void> {
    assert(this.kind !== "blockdev", "A block device does not grow");
    if (lengthBytes <= this.#sizeBytes) return;
    await this.#before({
      kind: "allocate",
      offsetBytes: this.#sizeBytes,
      lengthBytes: lengthBytes - this.#sizeBytes,
    });
    const file = this.#open();
    try {
      if (this.#options.fallocate !== undefined) {
        await this.#options.fallocate(file, lengthBytes);
      } else if ((await file.stat()).size < lengthBytes) {
        await file.truncate(lengthBytes);
      }
    } catch (error) {
      throw toBlksnapError(error, `Cannot grow "${this.path}" to ${lengthBytes} bytes`);
    }
    this.#sizeBytes = Math.max(this.#sizeBytes, lengthBytes);
  }

  close(): Promise<void> {
    this.#file?.close();
    this.#file = null;
    return Promise.resolve();
  }

  #open(): Deno.FsFile {
    if (this.#file === null) throw new BlksnapError("EBADF", `"${this.path}" is closed`);
    return this.#file;
  }

  async #before(request: IoRequest): Promise<void> {
    this.#open();
    const before = this.#options.hooks?.before;
    if (before === undefined) return;
    try {
      await before(request);
    } catch (error) {
      throw toBlksnapError(error, `${request.kind} of the difference storage "${this.path}"`);
    }
  }
}

/** Options of {@linkcode DiffStorage.open}. */
export interface DiffStorageOptions {
  readonly path: string;
  /** The most sectors the storage may grow to; more than 0. */
  readonly limitSectors: number;
  readonly params: Params;
  /** Default: {@linkcode openDiffStorageFile}. */
  readonly opener?: DiffStorageOpener;
  /** Receives `no_space` events. */
  readonly onEvent?: (event: SnapshotEvent) => void;
  /** Receives diagnostics. */
  readonly log?: (message: string) => void;
}

/** The space bookkeeping of a difference storage. */
export class DiffStorage {
  readonly file: DiffStorageFile;
  readonly limitSectors: number;
  readonly #minimumSectors: number;
  readonly #onEvent: (event: SnapshotEvent) => void;
  readonly #log: (message: string) => void;
  #capacitySectors: number;
  #requestedSectors: number;
  #filledSectors = 0;
  #lowSpace = false;
  #growthFailed = false;
  #overflowed = false;
  #growth: Promise<void> | null = null;
  /** Allocations waiting for the growth under way. */
  #growthWaiters: (() => void)[] = [];
  /** When the last growth ended, or the first allocation began to wait for one. */
  #lastGrowthMs = 0;
  #growthWaitSinceMs = 0;
  readonly #watchdog = new Watchdog(() => this.#checkStall());
  readonly #stallTimeoutMs: number;
  #closed = false;

  private constructor(file: DiffStorageFile, options: DiffStorageOptions) {
    this.file = file;
    this.limitSectors = options.limitSectors;
    this.#minimumSectors = options.params.diffStorageMinimumSectors;
    this.#stallTimeoutMs = options.params.cowStallTimeoutMs;
    this.#onEvent = options.onEvent ?? (() => {});
    this.#log = options.log ?? (() => {});
    this.#capacitySectors = Math.floor(file.sizeBytes / SECTOR_SIZE);
    this.#requestedSectors = this.#capacitySectors;
  }

  /**
   * `diff_storage_set_diff_storage`: opens the storage and, when it has
   * less than half a portion, grows it by one portion (within the limit).
   */
  static async open(options: DiffStorageOptions): Promise<DiffStorage> {
    if (!Number.isSafeInteger(options.limitSectors) || options.limitSectors <= 0) {
      throw new BlksnapError(
        "EINVAL",
        `The difference storage limit must be more than 0 sectors, not ${options.limitSectors}`,
      );
    }
    const file = await (options.opener ?? openDiffStorageFile)(options.path);
    try {
      const storage = new DiffStorage(file, options);
      await storage.#prepare();
      return storage;
    } catch (error) {
      await file.close();
      throw error;
    }
  }

  async #prepare(): Promise<void> {
    if (!this.#isHalfFull(this.#requestedSectors)) return;
    if (this.#capacitySectors === this.limitSectors) return;
    if (this.#capacitySectors > this.limitSectors) {
      throw new BlksnapError(
        "ENOSPC",
        `The difference storage "${this.file.path}" of ${this.#capacitySectors} sectors exceeds the limit of ${this.limitSectors}`,
      );
    }
    if (this.file.kind === "blockdev") {
      this.#say(`The difference storage device "${this.file.path}" is not large enough`);
      return;
    }
    const target = this.#capacitySectors +
      Math.min(this.#minimumSectors, this.limitSectors - this.#capacitySectors);
    await this.file.allocate(target * SECTOR_SIZE);
    this.#capacitySectors = target;
    this.#requestedSectors = target;
  }

  get kind(): DiffStorageKind {
    return this.file.kind;
  }
  /** The device that holds the storage. */
  get deviceId(): string {
    return this.file.deviceId;
  }
  /** Sectors actually allocated (fallocated). */
  get capacitySectors(): number {
    return this.#capacitySectors;
  }
  /** Sectors that may be handed out: the capacity plus a growth under way. */
  get requestedSectors(): number {
    return this.#requestedSectors;
  }
  /** Sectors handed out. */
  get filledSectors(): number {
    return this.#filledSectors;
  }
  /** Whether a request for space has failed. */
  get isOverflowed(): boolean {
    return this.#overflowed;
  }
  /** When a growth last ended (`performance.now()`), 0 if none: progress, for watchdogs. */
  get lastGrowthMs(): number {
    return this.#lastGrowthMs;
  }

  /**
   * `diff_storage_alloc`: hands out `countSectors` and resolves to their
   * sector offset, or to -1 when there is no room (then and from then on:
   * the caller marks its snapshot corrupted with ENOSPC). A request that
   * does not fit while the storage is growing waits for the growth, or
   * until the growth is found stalled.
   */
  async allocate(countSectors: number): Promise<number> {
    assert(Number.isSafeInteger(countSectors) && countSectors > 0, "Bad extent size");
    for (;;) {
      if (this.#overflowed || this.#closed) return -1;
      if (this.#filledSectors + countSectors <= this.#requestedSectors) {
        const offset = this.#filledSectors;
        this.#filledSectors += countSectors;
        this.#checkHalfFull(this.#requestedSectors - this.#filledSectors);
        return offset;
      }
      if (this.#growth !== null) {
        // woken when the growth ends, the storage closes or the watchdog gives up
        await new Promise<void>((resolve) => {
          if (this.#growthWaiters.length === 0) {
            this.#growthWaitSinceMs = performance.now();
            this.#watchdog.arm(this.#stallTimeoutMs);
          }
          this.#growthWaiters.push(resolve);
        });
      } else if (this.#canGrow()) {
        this.#startGrowth();
      } else {
        this.#overflowed = true;
        this.#say(`The difference storage "${this.file.path}" overflowed`);
        return -1;
      }
    }
  }

  /** Reads an extent's bytes. */
  read(offsetSectors: number, buf: Uint8Array): Promise<void> {
    this.#checkExtent(offsetSectors, buf.length);
    return this.file.read(offsetSectors * SECTOR_SIZE, buf);
  }

  /** Writes an extent's bytes. */
  write(offsetSectors: number, buf: Uint8Array): Promise<void> {
    this.#checkExtent(offsetSectors, buf.length);
    return this.file.write(offsetSectors * SECTOR_SIZE, buf);
  }

  /** Resolves once no growth is under way. */
  async settled(): Promise<void> {
    while (this.#growth !== null) {
      const growth = this.#growth;
      await growth;
      assert(this.#growth !== growth, "A growth that ended is still under way");
    }
  }

  /**
   * Fails waiting allocations, waits for a growth under way (a hung one
   * holds the close, as the kernel would wait for its I/O), then closes
   * the storage.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wakeGrowthWaiters();
    await this.settled();
    await this.file.close();
  }

  #checkExtent(offsetSectors: number, lengthBytes: number): void {
    assert(!this.#closed, "I/O on a closed difference storage");
    assert(
      Number.isSafeInteger(offsetSectors) && offsetSectors >= 0 &&
        lengthBytes % SECTOR_SIZE === 0 &&
        offsetSectors + lengthBytes / SECTOR_SIZE <= this.#filledSectors,
      `Extent ${offsetSectors}+${lengthBytes / SECTOR_SIZE} was not handed out`,
    );
  }

  #isHalfFull(sectorsLeft: number): boolean {
    return sectorsLeft <= this.#minimumSectors / 2;
  }

  #canGrow(): boolean {
    return this.file.kind !== "blockdev" && !this.#growthFailed &&
      this.#requestedSectors < this.limitSectors;
  }

  #checkHalfFull(sectorsLeft: number): void {
    if (!this.#isHalfFull(sectorsLeft) || this.#lowSpace) return;
    this.#lowSpace = true;
    if (this.#canGrow()) {
      this.#startGrowth();
      return;
    }
    this.#say(`The difference storage "${this.file.path}" cannot grow`);
    this.#emit({ code: "no_space", timeMs: Date.now(), requestedSectors: this.#minimumSectors });
  }

  #startGrowth(): void {
    assert(this.#growth === null, "Two growths at once");
    this.#lowSpace = true;
    this.#requestedSectors += Math.min(
      this.#minimumSectors,
      this.limitSectors - this.#requestedSectors,
    );
    this.#growth = this.#grow().catch((error) => {
      // a bug, but in the background: give the space up rather than crash
      this.#overflowed = true;
      this.#growthFailed = true;
      this.#say(`Growing "${this.file.path}" failed unexpectedly: ${messageOf(error)}`);
      this.#wakeGrowthWaiters();
    });
  }

  /**
   * `diff_storage_reallocate_work`: grows to the requested size in the
   * background. Rejects only for a bug (an assertion).
   */
  async #grow(): Promise<void> {
    // Not a step before #startGrowth has published this promise: a growth
    // that ended synchronously (an allocate that throws at once) would leave
    // its settled promise in #growth for ever, and waiters spinning on it.
    await Promise.resolve();
    try {
      while (!this.#closed && !this.#overflowed) {
        const target = this.#requestedSectors;
        try {
          await this.file.allocate(target * SECTOR_SIZE);
        } catch (error) {
          // Stop handing out space the file does not have; later requests
          // overflow and the snapshot is corrupted with ENOSPC.
          this.#requestedSectors = Math.max(this.#capacitySectors, this.#filledSectors);
          this.#growthFailed = true;
          this.#say(`Failed to grow "${this.file.path}": ${messageOf(error)}`);
          this.#emit({
            code: "no_space",
            timeMs: Date.now(),
            requestedSectors: target - this.#capacitySectors,
          });
          return;
        }
        assert(target <= this.limitSectors, "The difference storage grew past its limit");
        this.#capacitySectors = target;
        if (this.#capacitySectors >= this.#requestedSectors) return;
      }
    } finally {
      // In the same turn as the last step, so that no check sees one without the other.
      this.#growth = null;
      this.#lastGrowthMs = performance.now();
      if (!this.#growthFailed && !this.#closed && !this.#overflowed) {
        this.#lowSpace = false;
        // Space handed out during the growth may already leave less than half a portion.
        this.#checkHalfFull(this.#requestedSectors - this.#filledSectors);
      }
      this.#wakeGrowthWaiters();
    }
  }

  #wakeGrowthWaiters(): void {
    this.#watchdog.stop();
    const waiters = this.#growthWaiters;
    this.#growthWaiters = [];
    for (const wake of waiters) wake();
  }

  /** Allocations wait for a growth: give it up when it made no progress for the timeout. */
  #checkStall(): void {
    if (this.#growthWaiters.length === 0 || this.#growth === null) return;
    const idleMs = performance.now() - Math.max(this.#growthWaitSinceMs, this.#lastGrowthMs);
    if (idleMs < this.#stallTimeoutMs) {
      this.#watchdog.arm(this.#stallTimeoutMs - idleMs);
      return;
    }
    // Hand out nothing more: the snapshot is corrupted with ENOSPC by its users.
    this.#overflowed = true;
    this.#growthFailed = true;
    this.#say(
      `Growing "${this.file.path}" made no progress for ${Math.round(idleMs)} ms: ` +
        `the difference storage is given up as full`,
    );
    this.#emit({
      code: "no_space",
      timeMs: Date.now(),
      requestedSectors: this.#requestedSectors - this.#capacitySectors,
    });
    this.#wakeGrowthWaiters();
  }

  /** Logs; a log that throws is dropped. */
  #say(message: string): void {
    try {
      this.#log(message);
    } catch {
      // nowhere left to report it
    }
  }

  /** Raises an event; an event callback that throws is logged. */
  #emit(event: SnapshotEvent): void {
    try {
      this.#onEvent(event);
    } catch (error) {
      this.#say(`The ${event.code} event callback failed: ${messageOf(error)}`);
    }
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
