/**
 * The snapshot image's I/O path: what the original held at the take, read
 * from the original, a pool buffer or the difference storage, chunk by
 * chunk (lib/pipeline/cow.ts decides), on this queue's own ring.
 *
 * Read: runs of chunks still on the original are read in one SQE and
 * re-checked when it completes (a chunk that left LOADING meanwhile may have
 * been overwritten: read it again from its copy, invariant 2); chunks in a
 * buffer are copied and re-checked; stored chunks are read from the storage.
 *
 * Write: a stored chunk is written in the storage in place; a chunk never
 * copied is claimed, its old content loaded into a pool buffer, the write
 * laid over it, and it goes to the store worker as IN_MEMORY; a chunk
 * another worker holds in memory makes the request wait until it is stored.
 * Both CBT maps are marked, as the module's image does.
 *
 * A corrupted snapshot fails every image request with EIO.
 */
import { ERRNO } from "../../../ffi/errno.ts";
import { SQE } from "../../../ffi/uring_abi.ts";
import { UBLK_IO_OP } from "../../../ffi/ublk_abi.ts";
import { SECTOR_SHIFT, unitOf } from "../../engine/block_device.ts";
import { CbtMap } from "../../engine/cbt_map.ts";
import { BufferPool } from "../../pipeline/buffer_pool.ts";
import { bufferOf, CHUNK } from "../../pipeline/chunk_map.ts";
import {
  bufferReadValid,
  imageSource,
  imageWriteChunk,
  IW_FAILED,
  IW_STORAGE,
  originalReadValid,
  SRC_BUFFER,
  SRC_ORIGINAL,
  SRC_STORAGE,
} from "../../pipeline/cow.ts";
import { CTL, DeviceCtl, imageLane, LANE } from "../../pipeline/device_ctl.ts";
import { SpscRing } from "../../pipeline/spsc_ring.ts";
import { packUserData, UD_KIND } from "../../uring/user_data.ts";
import { unreachable } from "../../assert.ts";
import { type IoRequest, PENDING, type QueueContext, type UblkTarget } from "../target.ts";
import type { TrackedShared } from "./tracked.ts";
import { wakeAll, type Waker } from "./waker.ts";
import { Parking, SnapshotView } from "./snapshot_view.ts";

const MAX_PIECES = 32;
const SECTOR = 512;

const P_NONE = 0;
const P_ORIGINAL = 1;
const P_STORAGE_READ = 2;
const P_STORAGE_WRITE = 3;
const P_LOAD = 4;

/** Target files of an image queue: the original, then the difference storage. */
const FILE_ORIGINAL = 0;
const FILE_STORAGE = 1;

export class ImageTarget implements UblkTarget {
  readonly #ctl: DeviceCtl;
  readonly #cbt: CbtMap;
  readonly #pool: BufferPool;
  readonly #ring: SpscRing;
  readonly #waker: Waker;
  readonly #sizeBytes: number;

  readonly #op: Uint8Array;
  // Per tag and per piece, byte and chunk numbers in plain arrays: small
  // integers stay integers (a Float64Array makes each use floating point,
  // a helper call per operation under TCG); past 2^31 they hold doubles.
  readonly #start: number[]; // bytes
  readonly #bytes: number[];
  readonly #next: number[];
  readonly #last: number[];
  readonly #pieces: Uint8Array;
  readonly #failed: Int32Array;
  readonly #redo: number[];
  readonly #pType: Uint8Array;
  readonly #pFirst: number[];
  readonly #pLast: number[];
  readonly #pLength: Int32Array;
  readonly #pBuffer: Int32Array;
  readonly #pTagOffset: Int32Array;
  readonly #pChunkOffset: Int32Array;

  readonly #view: SnapshotView;
  readonly #parking: Parking;

  constructor(depth: number, shared: TrackedShared, waker: Waker) {
    this.#ctl = new DeviceCtl(shared.ctl);
    this.#cbt = CbtMap.fromShared(shared.cbt);
    this.#pool = new BufferPool(shared.pool);
    this.#ring = new SpscRing(shared.storeRing);
    this.#waker = waker;
    this.#sizeBytes = shared.sizeBytes;
    this.#op = new Uint8Array(depth);
    this.#start = Array.from({ length: depth }, () => 0);
    this.#bytes = Array.from({ length: depth }, () => 0);
    this.#next = Array.from({ length: depth }, () => 0);
    this.#last = Array.from({ length: depth }, () => 0);
    this.#pieces = new Uint8Array(depth);
    this.#failed = new Int32Array(depth);
    this.#redo = Array.from({ length: depth }, () => 0);
    this.#view = new SnapshotView(this.#ctl, shared.chunks, { poolWords: true });
    this.#parking = new Parking(depth, this.#ctl);
    const p = depth * MAX_PIECES;
    this.#pType = new Uint8Array(p);
    this.#pFirst = Array.from({ length: p }, () => 0);
    this.#pLast = Array.from({ length: p }, () => 0);
    this.#pLength = new Int32Array(p);
    this.#pBuffer = new Int32Array(p);
    this.#pTagOffset = new Int32Array(p);
    this.#pChunkOffset = new Int32Array(p);
  }

  start(q: QueueContext, req: IoRequest): number {
    const tag = req.tag;
    const op = req.op;
    if (op === UBLK_IO_OP.FLUSH) return 0; // the snapshot is not persistent
    if (op !== UBLK_IO_OP.READ && op !== UBLK_IO_OP.WRITE) return -ERRNO.EOPNOTSUPP;
    const bytes = req.nrSectors * SECTOR;
    if (bytes > q.maxIoBufBytes) return -ERRNO.EINVAL;
    if (this.#ctl.error !== 0 || !this.#view.current()) return -ERRNO.EIO;
    const start = req.startSector * SECTOR;
    this.#op[tag] = op;
    this.#start[tag] = start;
    this.#bytes[tag] = bytes;
    const shift = this.#view.chunkShift - SECTOR_SHIFT;
    this.#next[tag] = unitOf(req.startSector, shift);
    this.#last[tag] = unitOf(req.startSector + req.nrSectors - 1, shift);
    this.#failed[tag] = 0;
    this.#redo[tag] = -1;
    if (op === UBLK_IO_OP.WRITE) {
      this.#ctl.count(imageLane(q.qId), LANE.IMAGE_WRITES);
      try {
        this.#cbt.markBoth(req.startSector, req.nrSectors);
      } catch {
        // like the module: a map that cannot be marked does not fail the write
      }
      return this.#writeRound(q, tag);
    }
    this.#ctl.count(imageLane(q.qId), LANE.IMAGE_READS);
    return this.#readRound(q, tag);
  }

  onWake(q: QueueContext): void {
    for (let tag = 0; tag < this.#parking.depth; tag++) {
      if (!this.#parking.isParked(tag)) continue;
      this.#parking.unpark(tag);
      const result = this.#op[tag] === UBLK_IO_OP.WRITE
        ? this.#writeRound(q, tag)
        : this.#readRound(q, tag);
      if (result !== PENDING) q.complete(tag, result);
    }
  }

  onCompletion(q: QueueContext, tag: number, sub: number, res: number): number {
    const i = tag * MAX_PIECES + sub;
    const type = this.#pType[i]!;
    if (type === P_NONE) unreachable(`image completion for an empty piece ${sub} of tag ${tag}`);
    this.#pType[i] = P_NONE;
    this.#pieces[tag]!--;
    const ok = res === this.#pLength[i];
    const map = this.#view.map!;
    if (type === P_ORIGINAL) {
      if (!ok) this.#failed[tag] = -ERRNO.EIO;
      else {
        for (let n = this.#pFirst[i]!; n <= this.#pLast[i]!; n++) {
          if (!originalReadValid(map, n)) {
            const redo = this.#redo[tag]!;
            if (redo < 0 || n < redo) this.#redo[tag] = n;
            break;
          }
        }
      }
    } else if (type === P_LOAD) {
      const n = this.#pFirst[i]!;
      const buffer = this.#pBuffer[i]!;
      if (ok) {
        // Lay the write over the old content, then hand the chunk on.
        copyWords(
          this.#view.poolWords!,
          buffer * this.#view.bufferBytes + this.#pChunkOffset[i]!,
          q.bufferWords,
          tag * q.maxIoBufBytes + this.#pTagOffset[i]!,
          this.#pieceCopyLength(tag, n),
        );
        map.loaded(n);
        if (!this.#ring.push(n, buffer, res)) unreachable("image store ring full");
        this.#waker.wake(this.#ctl.w[CTL.STORE_EFD]!);
      } else {
        this.#pool.release(map.failed(n, CHUNK.LOADING));
        this.#ctl.corrupt(res < 0 ? res : -ERRNO.EIO);
        this.#failed[tag] = -ERRNO.EIO;
      }
      if (this.#ctl.waiters > 0) wakeAll(this.#waker, this.#ctl);
    } else if (!ok) {
      this.#failed[tag] = -ERRNO.EIO;
    }
    if (this.#pieces[tag]! > 0 || this.#parking.isParked(tag)) return PENDING;
    if (this.#failed[tag] !== 0) return this.#failed[tag]!;
    if (this.#op[tag] === UBLK_IO_OP.WRITE) return this.#writeRound(q, tag);
    const redo = this.#redo[tag]!;
    if (redo >= 0) {
      this.#redo[tag] = -1;
      if (redo < this.#next[tag]!) this.#next[tag] = redo;
    }
    return this.#readRound(q, tag);
  }

  #readRound(q: QueueContext, tag: number): number {
    if (this.#ctl.error !== 0) return this.#drainThenFail(tag);
    const map = this.#view.map!;
    const last = this.#last[tag]!;
    let n = this.#next[tag]!;
    while (n <= last && this.#pieces[tag]! < MAX_PIECES) {
      const word = map.word(n);
      const src = imageSource(word);
      if (src === SRC_ORIGINAL) {
        let m = n;
        while (m < last && imageSource(map.word(m + 1)) === SRC_ORIGINAL) m++;
        const from = this.#clipStart(tag, n);
        const to = this.#clipEnd(tag, m);
        this.#piece(q, tag, P_ORIGINAL, n, m, FILE_ORIGINAL, from, to - from, false);
        n = m + 1;
      } else if (src === SRC_BUFFER) {
        const from = this.#clipStart(tag, n);
        const length = this.#clipEnd(tag, n) - from;
        copyWords(
          q.bufferWords,
          tag * q.maxIoBufBytes + (from - this.#start[tag]!),
          this.#view.poolWords!,
          bufferOf(word) * this.#view.bufferBytes + (from - n * this.#view.chunkBytes),
          length,
        );
        if (bufferReadValid(map, n, word)) n++; // else: moved on meanwhile, look again
      } else if (src === SRC_STORAGE) {
        const from = this.#clipStart(tag, n);
        const length = this.#clipEnd(tag, n) - from;
        const at = map.offset(n) * this.#view.unitBytes + (from - n * this.#view.chunkBytes);
        this.#piece(q, tag, P_STORAGE_READ, n, n, FILE_STORAGE, from, length, false, at);
        n++;
      } else {
        this.#failed[tag] = -ERRNO.EIO;
        break;
      }
    }
    this.#next[tag] = n;
    if (this.#pieces[tag]! > 0) return PENDING;
    if (this.#failed[tag] !== 0) return this.#failed[tag]!;
    if (n <= last) return this.#readRound(q, tag);
    // A corruption stops copy-on-write before any write skips it: seen now, a
    // read of the original may have raced such a write.
    if (this.#ctl.error !== 0) return -ERRNO.EIO;
    return this.#bytes[tag]!;
  }

  #writeRound(q: QueueContext, tag: number): number {
    if (this.#ctl.error !== 0) return this.#drainThenFail(tag);
    const map = this.#view.map!;
    const last = this.#last[tag]!;
    let n = this.#next[tag]!;
    while (n <= last && this.#pieces[tag]! < MAX_PIECES) {
      let r = imageWriteChunk(map, this.#pool, n);
      if (r < 0 && r !== IW_STORAGE && r !== IW_FAILED) {
        this.#parking.park(tag);
        r = imageWriteChunk(map, this.#pool, n);
        if (r < 0 && r !== IW_STORAGE && r !== IW_FAILED) {
          this.#next[tag] = n;
          return PENDING;
        }
        this.#parking.unpark(tag);
      }
      const from = this.#clipStart(tag, n);
      const length = this.#clipEnd(tag, n) - from;
      const inChunk = from - n * this.#view.chunkBytes;
      if (r === IW_FAILED) {
        this.#failed[tag] = -ERRNO.EIO;
        break;
      }
      if (r === IW_STORAGE) {
        const at = map.offset(n) * this.#view.unitBytes + inChunk;
        this.#piece(
          q,
          tag,
          P_STORAGE_WRITE,
          n,
          n,
          FILE_STORAGE,
          from,
          length,
          true,
          at,
        );
      } else {
        // Claimed with buffer r: load the whole chunk's old content first.
        const chunkStart = n * this.#view.chunkBytes;
        const chunkLength = Math.min(this.#view.chunkBytes, this.#sizeBytes - chunkStart);
        const i = this.#piece(
          q,
          tag,
          P_LOAD,
          n,
          n,
          FILE_ORIGINAL,
          from,
          chunkLength,
          false,
          chunkStart,
          this.#view.poolBase + r * this.#view.bufferBytes,
        );
        this.#pBuffer[i] = r;
        this.#pChunkOffset[i] = inChunk;
      }
      n++;
    }
    this.#next[tag] = n;
    if (this.#pieces[tag]! > 0) return PENDING;
    if (this.#failed[tag] !== 0) return this.#failed[tag]!;
    if (n <= last) return this.#writeRound(q, tag);
    return this.#bytes[tag]!;
  }

  /**
   * Queues one piece of a request. `from` is the byte of the device the piece
   * starts at; the tag's buffer is at `from - start`. `at` is the file offset
   * (default `from`); `address` overrides the memory (a pool buffer).
   */
  #piece(
    q: QueueContext,
    tag: number,
    type: number,
    first: number,
    last: number,
    file: number,
    from: number,
    length: number,
    write: boolean,
    at = from,
    address = 0,
  ): number {
    let slot = 0;
    const base = tag * MAX_PIECES;
    while (this.#pType[base + slot] !== P_NONE) slot++;
    const i = base + slot;
    const tagOffset = from - this.#start[tag]!;
    this.#pType[i] = type;
    this.#pFirst[i] = first;
    this.#pLast[i] = last;
    this.#pLength[i] = length;
    this.#pTagOffset[i] = tagOffset;
    this.#pieces[tag]!++;
    const sqe = q.ring.prepBuf(
      write,
      q.targetFile(file),
      address !== 0 ? address : q.bufferAddress(tag) + tagOffset,
      length,
      at,
      packUserData(UD_KIND.TARGET_IO, tag, slot),
    );
    q.ring.sqeU8[sqe + SQE.flags] = q.fileFlags;
    q.targetSubmitted();
    return i;
  }

  /** Bytes of the write that fall in chunk `n`. */
  #pieceCopyLength(tag: number, n: number): number {
    return this.#clipEnd(tag, n) - this.#clipStart(tag, n);
  }

  #clipStart(tag: number, n: number): number {
    return Math.max(this.#start[tag]!, n * this.#view.chunkBytes);
  }

  #clipEnd(tag: number, n: number): number {
    return Math.min(this.#start[tag]! + this.#bytes[tag]!, (n + 1) * this.#view.chunkBytes);
  }

  #drainThenFail(tag: number): number {
    this.#failed[tag] = -ERRNO.EIO;
    return this.#pieces[tag]! > 0 ? PENDING : -ERRNO.EIO;
  }
}

/** Copies `length` bytes between two word views, at byte offsets (all multiples of 4). */
function copyWords(
  dst: Int32Array,
  dstByte: number,
  src: Int32Array,
  srcByte: number,
  length: number,
): void {
  if (((dstByte | srcByte | length) & 3) !== 0) unreachable("unaligned image copy");
  let d = dstByte >>> 2;
  let s = srcByte >>> 2;
  const end = s + (length >>> 2);
  while (s < end) dst[d++] = src[s++]!;
}
