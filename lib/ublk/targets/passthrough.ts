/**
 * The tracked device's I/O path without snapshots: every request passes
 * straight through to the original device, on the queue's own io_uring.
 *
 * READ/WRITE use O_DIRECT on the original (the per-tag buffers are page
 * aligned), FUA becomes RWF_DSYNC, FLUSH becomes fdatasync, DISCARD becomes
 * fallocate(PUNCH_HOLE) (the block layer turns it into an unmapping
 * write-zeroes; a device without that support ignores the hint, which discard
 * allows). WRITE_ZEROES becomes fallocate(PUNCH_HOLE) too unless the request
 * forbids unmapping, falling back to fallocate(ZERO_RANGE), which the kernel
 * completes by writing zeroes when the device cannot.
 */
import { ERRNO } from "../../../ffi/errno.ts";
import { FALLOC_FL } from "../../../ffi/libc.ts";
import { IORING_FSYNC_DATASYNC, IORING_OP, RWF_DSYNC, SQE } from "../../../ffi/uring_abi.ts";
import { UBLK_IO_F, UBLK_IO_OP } from "../../../ffi/ublk_abi.ts";
import { packUserData, UD_KIND } from "../../uring/user_data.ts";
import { type IoRequest, PENDING, type QueueContext, type UblkTarget } from "../target.ts";

export class PassthroughTarget implements UblkTarget {
  readonly #fd: number;
  /** The op each tag is serving, to interpret its completion. */
  readonly #ops: Uint8Array;
  /** WRITE_ZEROES range per tag, for the ZERO_RANGE retry. */
  readonly #offsets: Float64Array;
  readonly #lengths: Uint32Array;

  constructor(originalFd: number, depth: number) {
    this.#fd = originalFd;
    this.#ops = new Uint8Array(depth);
    this.#offsets = new Float64Array(depth);
    this.#lengths = new Uint32Array(depth);
  }

  start(q: QueueContext, req: IoRequest): number {
    const ring = q.ring;
    const tag = req.tag;
    const ud = packUserData(UD_KIND.TARGET_IO, tag);
    const offset = req.startSector * 512;
    const bytes = req.nrSectors * 512;
    this.#ops[tag] = req.op;
    switch (req.op) {
      case UBLK_IO_OP.READ:
      case UBLK_IO_OP.WRITE: {
        if (bytes > q.maxIoBufBytes) return -ERRNO.EINVAL;
        const opcode = req.op === UBLK_IO_OP.READ ? IORING_OP.READ : IORING_OP.WRITE;
        const off = ring.prepRw(opcode, this.#fd, req.bufAddress, bytes, offset, ud);
        if (req.flags & UBLK_IO_F.FUA) ring.sqeU32[(off + SQE.rwFlags) >> 2] = RWF_DSYNC;
        break;
      }
      case UBLK_IO_OP.FLUSH: {
        const off = ring.prepRw(IORING_OP.FSYNC, this.#fd, 0, 0, 0, ud);
        ring.sqeU32[(off + SQE.rwFlags) >> 2] = IORING_FSYNC_DATASYNC;
        break;
      }
      case UBLK_IO_OP.DISCARD:
        // fallocate SQE: off = offset, addr = length, len = mode.
        ring.prepRw(
          IORING_OP.FALLOCATE,
          this.#fd,
          bytes,
          FALLOC_FL.PUNCH_HOLE | FALLOC_FL.KEEP_SIZE,
          offset,
          ud,
        );
        break;
      case UBLK_IO_OP.WRITE_ZEROES:
        if (req.flags & UBLK_IO_F.NOUNMAP) this.#zeroRange(ring, tag, offset, bytes);
        else {
          ring.prepRw(
            IORING_OP.FALLOCATE,
            this.#fd,
            bytes,
            FALLOC_FL.PUNCH_HOLE | FALLOC_FL.KEEP_SIZE,
            offset,
            ud,
          );
          this.#offsets[tag] = offset;
          this.#lengths[tag] = bytes;
        }
        break;
      default:
        return -ERRNO.EOPNOTSUPP;
    }
    q.targetSubmitted();
    return PENDING;
  }

  #zeroRange(ring: QueueContext["ring"], tag: number, offset: number, bytes: number): void {
    ring.prepRw(
      IORING_OP.FALLOCATE,
      this.#fd,
      bytes,
      FALLOC_FL.ZERO_RANGE | FALLOC_FL.KEEP_SIZE,
      offset,
      packUserData(UD_KIND.TARGET_IO, tag, 1),
    );
  }

  onCompletion(q: QueueContext, tag: number, sub: number, res: number): number {
    switch (this.#ops[tag]) {
      case UBLK_IO_OP.READ:
      case UBLK_IO_OP.WRITE:
        // A short transfer is committed as such; the kernel requeues the rest.
        return res;
      case UBLK_IO_OP.DISCARD:
        return res === -ERRNO.EOPNOTSUPP ? 0 : Math.min(res, 0);
      case UBLK_IO_OP.WRITE_ZEROES:
        if (res === -ERRNO.EOPNOTSUPP && sub === 0) {
          this.#zeroRange(q.ring, tag, this.#offsets[tag]!, this.#lengths[tag]!);
          q.targetSubmitted();
          return PENDING;
        }
        return Math.min(res, 0);
      default:
        return Math.min(res, 0);
    }
  }
}
