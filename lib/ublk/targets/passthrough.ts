/**
 * The tracked device's I/O path without snapshots: every request passes
 * straight through to the original device (the queue's target file 0), on
 * the queue's own io_uring.
 *
 * READ/WRITE use O_DIRECT on the original (the per-tag buffers are page
 * aligned), FUA becomes RWF_DSYNC, FLUSH becomes fdatasync. DISCARD becomes
 * the block device's own asynchronous discard (BLOCK_URING_CMD_DISCARD,
 * Linux 6.12+); where the kernel or the device refuses it, fallocate
 * (PUNCH_HOLE), which the block layer turns into an unmapping write-zeroes,
 * and where that is refused too the hint is dropped, which discard allows.
 * WRITE_ZEROES becomes fallocate(PUNCH_HOLE) unless the request forbids
 * unmapping, falling back to fallocate(ZERO_RANGE), which the kernel completes
 * by writing zeroes when the device cannot.
 */
import { ERRNO } from "../../../ffi/errno.ts";
import { FALLOC_FL } from "../../../ffi/libc.ts";
import {
  BLOCK_URING_CMD_DISCARD,
  IORING_FSYNC_DATASYNC,
  IORING_OP,
  RWF_DSYNC,
  SQE,
} from "../../../ffi/uring_abi.ts";
import { UBLK_IO_F, UBLK_IO_OP } from "../../../ffi/ublk_abi.ts";
import { packUserData, UD_KIND } from "../../uring/user_data.ts";
import { type IoRequest, PENDING, type QueueContext, type UblkTarget } from "../target.ts";

const PUNCH_HOLE = FALLOC_FL.PUNCH_HOLE | FALLOC_FL.KEEP_SIZE;
const ZERO_RANGE = FALLOC_FL.ZERO_RANGE | FALLOC_FL.KEEP_SIZE;

export class PassthroughTarget implements UblkTarget {
  /** The op each tag is serving, to interpret its completion. */
  readonly #ops: Uint8Array;
  /** Cleared when the kernel refuses BLOCK_URING_CMD_DISCARD: use fallocate from then on. */
  #uringDiscard = true;
  /** DISCARD and WRITE_ZEROES range per tag, for the fallback. */
  readonly #offsets: Float64Array;
  readonly #lengths: Uint32Array;

  constructor(depth: number) {
    this.#ops = new Uint8Array(depth);
    this.#offsets = new Float64Array(depth);
    this.#lengths = new Uint32Array(depth);
  }

  start(q: QueueContext, req: IoRequest): number {
    const tag = req.tag;
    const offset = req.startSector * 512;
    const bytes = req.nrSectors * 512;
    this.#ops[tag] = req.op;
    switch (req.op) {
      case UBLK_IO_OP.READ:
      case UBLK_IO_OP.WRITE: {
        if (bytes > q.maxIoBufBytes) return -ERRNO.EINVAL;
        const off = q.ring.prepBuf(
          req.op === UBLK_IO_OP.WRITE,
          q.targetFile(0),
          req.bufAddress,
          bytes,
          offset,
          packUserData(UD_KIND.TARGET_IO, tag, 0),
        );
        q.ring.sqeU8[off + SQE.flags] = q.fileFlags;
        q.targetSubmitted();
        if (req.flags & UBLK_IO_F.FUA) q.ring.sqeU32[(off + SQE.rwFlags) >> 2] = RWF_DSYNC;
        break;
      }
      case UBLK_IO_OP.FLUSH: {
        const off = prep(q, IORING_OP.FSYNC, 0, 0, 0, tag, 0);
        q.ring.sqeU32[(off + SQE.rwFlags) >> 2] = IORING_FSYNC_DATASYNC;
        break;
      }
      case UBLK_IO_OP.DISCARD:
        this.#offsets[tag] = offset;
        this.#lengths[tag] = bytes;
        if (this.#uringDiscard) {
          const off = prep(q, IORING_OP.URING_CMD, offset, 0, 0, tag, 0);
          q.ring.sqeU32[(off + SQE.cmdOp) >> 2] = BLOCK_URING_CMD_DISCARD;
          q.ring.setU64(off + SQE.addr3, bytes);
        } else this.#fallocate(q, tag, PUNCH_HOLE, 1);
        break;
      case UBLK_IO_OP.WRITE_ZEROES:
        this.#offsets[tag] = offset;
        this.#lengths[tag] = bytes;
        if (req.flags & UBLK_IO_F.NOUNMAP) this.#fallocate(q, tag, ZERO_RANGE, 1);
        else this.#fallocate(q, tag, PUNCH_HOLE, 0);
        break;
      default:
        return -ERRNO.EOPNOTSUPP;
    }
    return PENDING;
  }

  onCompletion(q: QueueContext, tag: number, sub: number, res: number): number {
    switch (this.#ops[tag]) {
      case UBLK_IO_OP.READ:
      case UBLK_IO_OP.WRITE:
        // A short transfer is committed as such; the kernel requeues the rest.
        return res;
      case UBLK_IO_OP.DISCARD:
        if (sub === 0 && (res === -ERRNO.EOPNOTSUPP || res === -ERRNO.EINVAL)) {
          // Before 6.12 (EINVAL: unknown command) or a device without discard.
          this.#uringDiscard = false;
          this.#fallocate(q, tag, PUNCH_HOLE, 1);
          return PENDING;
        }
        return res === -ERRNO.EOPNOTSUPP ? 0 : Math.min(res, 0);
      case UBLK_IO_OP.WRITE_ZEROES:
        if (res === -ERRNO.EOPNOTSUPP && sub === 0) {
          this.#fallocate(q, tag, ZERO_RANGE, 1);
          return PENDING;
        }
        return Math.min(res, 0);
      default:
        return Math.min(res, 0);
    }
  }

  /** fallocate(`mode`) over the tag's stored range; `sub` 1 marks the last attempt. */
  #fallocate(q: QueueContext, tag: number, mode: number, sub: number): void {
    // fallocate SQE: off = offset, addr = length, len = mode.
    prep(q, IORING_OP.FALLOCATE, this.#lengths[tag]!, mode, this.#offsets[tag]!, tag, sub);
  }
}

/** Queues one SQE on the original for `tag`; returns its offset in the SQE array. */
function prep(
  q: QueueContext,
  opcode: number,
  addr: number,
  len: number,
  offset: number,
  tag: number,
  sub: number,
): number {
  const off = q.ring.prepRw(
    opcode,
    q.targetFile(0),
    addr,
    len,
    offset,
    packUserData(UD_KIND.TARGET_IO, tag, sub),
  );
  q.ring.sqeU8[off + SQE.flags] = q.fileFlags;
  q.targetSubmitted();
  return off;
}
