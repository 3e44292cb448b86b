/**
 * An io_uring driven from JavaScript through liburing 2.3.
 *
 * liburing 2.3 exports `io_uring_get_sqe` and the submit calls but none of the
 * inline helpers, so this class does what they do: it claims SQEs by moving
 * liburing's local `sqe_tail`, writes them straight into the mapped SQE array,
 * reads CQEs from the mapped CQ ring and advances the CQ head with an atomic
 * store. The ring struct lives in C memory, and the layout (ffi/uring_abi.ts)
 * is checked against a live ring once per ring.
 *
 * Thread rule: a Ring belongs to the thread (Worker) that created it.
 */
import { ERRNO, ErrnoError } from "../../ffi/errno.ts";
import type { Libc } from "../../ffi/libc.ts";
import type { LiburingSymbols } from "../../ffi/liburing.ts";
import { CQE, IORING_OP, IORING_SETUP, PARAMS, RING, SQE } from "../../ffi/uring_abi.ts";
import { packUserData, UD_KIND } from "./user_data.ts";
import { assert } from "../assert.ts";

export interface RingOptions {
  /** SQ entries (power of two). */
  entries: number;
  /** IORING_SETUP_* flags. */
  flags?: number;
  /** CQ entries; defaults to twice `entries`. */
  cqEntries?: number;
}

const TWO_32 = 4_294_967_296;

/** A pointer as a JS number (x86-64 user addresses fit in 47 bits). */
export function addressOf(ptr: Deno.PointerObject): number {
  const value = Number(Deno.UnsafePointer.value(ptr));
  assert(Number.isSafeInteger(value) && value > 0, "pointer out of range");
  return value;
}

function viewU32(address: number, count = 1): Uint32Array {
  const ptr = Deno.UnsafePointer.create(BigInt(address));
  assert(ptr !== null, "null ring pointer");
  return new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(ptr, count * 4));
}

export class Ring {
  readonly ptr: Deno.PointerObject;
  readonly flags: number;
  readonly sqeSize: number;
  readonly sqEntries: number;
  readonly cqEntries: number;
  /** The SQE array: byte, u32 and i32 views over the same mapped memory. */
  readonly sqeU8: Uint8Array;
  readonly sqeU32: Uint32Array;
  readonly sqeI32: Int32Array;

  readonly #uring: LiburingSymbols;
  readonly #libc: Libc;
  readonly #struct: Uint32Array; // the 216-byte struct io_uring
  readonly #sqKhead: Uint32Array;
  readonly #sqMask: number;
  readonly #cqKhead: Uint32Array;
  readonly #cqKtail: Uint32Array;
  readonly #cqes: Int32Array;
  readonly #cqMask: number;
  readonly #waitTs = new BigInt64Array(2);
  readonly #cqePtrOut = new BigUint64Array(1);
  /** Registered buffers: [start, end) addresses of buffer index i (see registerBuffers). */
  #fixedStart: Float64Array = new Float64Array(0);
  #fixedEnd: Float64Array = new Float64Array(0);
  #closed = false;

  constructor(uring: LiburingSymbols, libc: Libc, options: RingOptions) {
    this.#uring = uring;
    this.#libc = libc;
    const flags = (options.flags ?? 0) | (options.cqEntries ? IORING_SETUP.CQSIZE : 0);
    this.flags = flags;
    this.sqeSize = flags & IORING_SETUP.SQE128 ? SQE.size128 : SQE.size;

    this.ptr = libc.alignedAlloc(64, RING.size);
    const params = libc.alignedAlloc(64, PARAMS.size);
    try {
      const p = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(params, PARAMS.size));
      p[PARAMS.flags / 4] = flags;
      if (options.cqEntries) p[PARAMS.cqEntries / 4] = options.cqEntries;
      const rc = uring.io_uring_queue_init_params(options.entries, this.ptr, params);
      if (rc < 0) throw new ErrnoError(`io_uring_queue_init_params(${options.entries})`, -rc);
      this.sqEntries = p[PARAMS.sqEntries / 4]!;
      this.cqEntries = p[PARAMS.cqEntries / 4]!;
    } catch (err) {
      libc.free(this.ptr);
      throw err;
    } finally {
      libc.free(params);
    }

    this.#struct = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(this.ptr, RING.size));
    const s = this.#struct;
    const ptrAt = (off: number) => s[off / 4]! + s[off / 4 + 1]! * TWO_32;
    this.#sqKhead = viewU32(ptrAt(RING.sq.khead));
    this.#sqMask = s[RING.sq.ringMask / 4]!;
    const sqes = ptrAt(RING.sq.sqes);
    const sqeBytes = this.sqEntries * this.sqeSize;
    const sqePtr = Deno.UnsafePointer.create(BigInt(sqes));
    assert(sqePtr !== null, "null SQE array");
    const sqeBuf = Deno.UnsafePointerView.getArrayBuffer(sqePtr, sqeBytes);
    this.sqeU8 = new Uint8Array(sqeBuf);
    this.sqeU32 = new Uint32Array(sqeBuf);
    this.sqeI32 = new Int32Array(sqeBuf);
    this.#cqKhead = viewU32(ptrAt(RING.cq.khead));
    this.#cqKtail = viewU32(ptrAt(RING.cq.ktail));
    this.#cqMask = s[RING.cq.ringMask / 4]!;
    const cqesPtr = Deno.UnsafePointer.create(BigInt(ptrAt(RING.cq.cqes)));
    assert(cqesPtr !== null, "null CQE array");
    this.#cqes = new Int32Array(
      Deno.UnsafePointerView.getArrayBuffer(cqesPtr, this.cqEntries * CQE.size),
    );
    this.#checkLayout(sqes, ptrAt(RING.sq.array));
  }

  /** Number of SQEs claimed but not yet submitted. */
  get pending(): number {
    const s = this.#struct;
    return (s[RING.sq.sqeTail / 4]! - s[RING.sq.sqeHead / 4]!) >>> 0;
  }

  /** Free SQ slots. */
  get sqSpace(): number {
    const tail = this.#struct[RING.sq.sqeTail / 4]!;
    return this.sqEntries - ((tail - Atomics.load(this.#sqKhead, 0)) >>> 0);
  }

  /**
   * Claims the next SQE, zeroed, and returns its byte offset into `sqeU8`
   * (divide by 4 for `sqeU32`). Returns -1 when the SQ is full.
   */
  getSqe(): number {
    const s = this.#struct;
    const tail = s[RING.sq.sqeTail / 4]!;
    const next = (tail + 1) >>> 0;
    if (((next - Atomics.load(this.#sqKhead, 0)) >>> 0) > this.sqEntries) return -1;
    s[RING.sq.sqeTail / 4] = next;
    const off = (tail & this.#sqMask) * this.sqeSize;
    // A loop of word stores is several times faster than fill() for 64 bytes.
    const u32 = this.sqeU32;
    for (let i = off >> 2, end = (off + this.sqeSize) >> 2; i < end; i++) u32[i] = 0;
    return off;
  }

  /**
   * Like getSqe(), but a full SQ is flushed to the kernel first (what
   * liburing's callers do), so a burst larger than the ring still goes.
   */
  sqe(): number {
    let off = this.getSqe();
    if (off < 0) {
      this.submit();
      off = this.getSqe();
    }
    assert(off >= 0, "io_uring SQ overflow: the kernel took no SQE");
    return off;
  }

  /** Writes a u64 that is given as a JS number (exact up to 2^53). */
  setU64(byteOffset: number, value: number): void {
    const i = byteOffset >> 2;
    this.sqeU32[i] = value >>> 0;
    // No division for the common case (a division is a costly helper under TCG).
    this.sqeU32[i + 1] = value > 0xffff_ffff ? Math.floor(value / TWO_32) : 0;
  }

  /** Fills a read/write-style SQE. `addr` is a C address as a number. */
  prepRw(
    opcode: number,
    fd: number,
    addr: number,
    len: number,
    offset: number,
    userData: number,
  ): number {
    const off = this.sqe();
    this.sqeU8[off + SQE.opcode] = opcode;
    this.sqeI32[(off + SQE.fd) >> 2] = fd;
    this.setU64(off + SQE.off, offset);
    this.setU64(off + SQE.addr, addr);
    this.sqeU32[(off + SQE.len) >> 2] = len;
    this.sqeU32[(off + SQE.userData) >> 2] = userData;
    return off;
  }

  /**
   * Registers `fds` as fixed files (index i is fds[i]); SQEs then name them by
   * index with IOSQE_FIXED_FILE, which spares the kernel a file lookup and
   * reference count per request.
   */
  registerFiles(fds: readonly number[]): void {
    const rc = this.#uring.io_uring_register_files(this.ptr, new Int32Array(fds), fds.length);
    if (rc < 0) throw new ErrnoError("io_uring_register_files", -rc);
  }

  /**
   * Registers memory regions as fixed buffers (index i is regions[i]). The
   * kernel pins their pages once, so reads and writes into them (READ_FIXED,
   * WRITE_FIXED: see prepBuf) skip pinning user pages per request on O_DIRECT
   * files and copy through the kernel's own mapping on buffered ones. Throws
   * when the kernel refuses (e.g. RLIMIT_MEMLOCK without CAP_IPC_LOCK).
   */
  registerBuffers(regions: readonly { address: number; bytes: number }[]): void {
    assert(regions.length > 0 && regions.length < 256, "1 to 255 fixed buffers");
    const iov = new BigUint64Array(regions.length * 2);
    regions.forEach((r, i) => {
      iov[2 * i] = BigInt(r.address);
      iov[2 * i + 1] = BigInt(r.bytes);
    });
    const rc = this.#uring.io_uring_register_buffers(this.ptr, iov, regions.length);
    if (rc < 0) throw new ErrnoError("io_uring_register_buffers", -rc);
    this.#fixedStart = new Float64Array(regions.map((r) => r.address));
    this.#fixedEnd = new Float64Array(regions.map((r) => r.address + r.bytes));
  }

  /**
   * prepRw() for a READ or WRITE of memory: READ_FIXED/WRITE_FIXED with the
   * buffer's index when [addr, addr+len) lies in a registered buffer, the
   * plain opcode otherwise.
   */
  prepBuf(
    write: boolean,
    fd: number,
    addr: number,
    len: number,
    offset: number,
    userData: number,
  ): number {
    const starts = this.#fixedStart;
    for (let i = 0; i < starts.length; i++) {
      if (addr >= starts[i]! && addr + len <= this.#fixedEnd[i]!) {
        const off = this.prepRw(
          write ? IORING_OP.WRITE_FIXED : IORING_OP.READ_FIXED,
          fd,
          addr,
          len,
          offset,
          userData,
        );
        this.sqeU8[off + SQE.bufIndex] = i; // u16, little-endian; fewer than 256 buffers
        return off;
      }
    }
    return this.prepRw(write ? IORING_OP.WRITE : IORING_OP.READ, fd, addr, len, offset, userData);
  }

  /** Registers the ring's own fd so that io_uring_enter skips the fd lookup (5.18+). */
  registerRingFd(): boolean {
    return this.#uring.io_uring_register_ring_fd(this.ptr) >= 0;
  }

  /** Submits claimed SQEs; returns how many the kernel took. */
  submit(): number {
    const rc = this.#uring.io_uring_submit(this.ptr);
    if (rc < 0 && rc !== -ERRNO.EINTR) throw new ErrnoError("io_uring_submit", -rc);
    return Math.max(rc, 0);
  }

  /**
   * Submits and waits for at least `waitNr` completions. EINTR, and the
   * transient EAGAIN and EBUSY (the kernel is short of resources, or completions
   * must be reaped first), return 0: the caller reaps what is there and calls again.
   */
  submitAndWait(waitNr: number): number {
    const rc = this.#uring.io_uring_submit_and_wait(this.ptr, waitNr);
    if (rc < 0 && rc !== -ERRNO.EINTR && rc !== -ERRNO.EAGAIN && rc !== -ERRNO.EBUSY) {
      throw new ErrnoError("io_uring_submit_and_wait", -rc);
    }
    return Math.max(rc, 0);
  }

  /**
   * Submits and waits for `waitNr` completions or `timeoutMs`, whichever is
   * first. Returns false on timeout.
   */
  submitAndWaitTimeout(waitNr: number, timeoutMs: number): boolean {
    this.#waitTs[0] = BigInt(Math.floor(timeoutMs / 1000));
    this.#waitTs[1] = BigInt((timeoutMs % 1000) * 1_000_000);
    const rc = this.#uring.io_uring_submit_and_wait_timeout(
      this.ptr,
      this.#cqePtrOut,
      waitNr,
      this.#waitTs,
      null,
    );
    if (rc === -ERRNO.ETIME || rc === -ERRNO.EINTR) return false;
    if (rc < 0) throw new ErrnoError("io_uring_submit_and_wait_timeout", -rc);
    return true;
  }

  /** Runs pending task work so completions appear without blocking. */
  getEvents(): void {
    const rc = this.#uring.io_uring_get_events(this.ptr);
    if (rc < 0 && rc !== -ERRNO.EINTR && rc !== -ERRNO.EAGAIN) {
      throw new ErrnoError("io_uring_get_events", -rc);
    }
  }

  /** Completions ready in the CQ. */
  cqReady(): number {
    return (Atomics.load(this.#cqKtail, 0) - this.#cqKhead[0]!) >>> 0;
  }

  /**
   * Calls `handle(userData, res, flags)` for every ready CQE, then releases
   * them all with one store of the CQ head. Returns the number handled.
   */
  drain(handle: (userData: number, res: number, flags: number) => void): number {
    let head = this.#cqKhead[0]!;
    const tail = Atomics.load(this.#cqKtail, 0);
    const count = (tail - head) >>> 0;
    const cqes = this.#cqes;
    const mask = this.#cqMask;
    while (head !== tail) {
      const i = (head & mask) * (CQE.size / 4);
      // user_data's high half is always zero (lib/uring/user_data.ts).
      handle(cqes[i]! >>> 0, cqes[i + 2]!, cqes[i + 3]! >>> 0);
      head = (head + 1) >>> 0;
    }
    if (count > 0) Atomics.store(this.#cqKhead, 0, head);
    return count;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#uring.io_uring_queue_exit(this.ptr);
    this.#libc.free(this.ptr);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * Checks the struct offsets against what liburing itself reports: the ring
   * sizes and flags it stored, the SQE address its own io_uring_get_sqe picks,
   * and a NOP round trip through the CQ.
   */
  #checkLayout(sqesAddress: number, arrayAddress: number): void {
    const s = this.#struct;
    assert(s[RING.sq.ringEntries / 4] === this.sqEntries, "io_uring layout: sq.ring_entries");
    assert(s[RING.cq.ringEntries / 4] === this.cqEntries, "io_uring layout: cq.ring_entries");
    assert(s[RING.flags / 4] === this.flags, "io_uring layout: ring.flags");
    assert(this.#sqMask === this.sqEntries - 1, "io_uring layout: sq.ring_mask");
    assert(this.#cqMask === this.cqEntries - 1, "io_uring layout: cq.ring_mask");
    // liburing 2.3 maps SQ slots 1:1 onto SQEs at set-up; claimed SQEs rely on it.
    const array = viewU32(arrayAddress, this.sqEntries);
    for (let i = 0; i < this.sqEntries; i++) array[i] = i;

    const tail = s[RING.sq.sqeTail / 4]!;
    const expected = sqesAddress + (tail & this.#sqMask) * this.sqeSize;
    const got = this.#uring.io_uring_get_sqe(this.ptr);
    assert(got !== null, "io_uring_get_sqe returned NULL on a fresh ring");
    assert(addressOf(got) === expected, "io_uring layout: SQE address differs from liburing's");
    const off = expected - sqesAddress;
    this.sqeU8.fill(0, off, off + this.sqeSize);
    this.sqeU8[off + SQE.opcode] = IORING_OP.NOP;
    const ud = packUserData(UD_KIND.NOP, 0x5a5a);
    this.sqeU32[(off + SQE.userData) >> 2] = ud;
    this.submitAndWait(1);
    let seen = 0;
    this.drain((userData, res) => {
      assert(userData === ud && res === 0, "io_uring layout: NOP completion mismatch");
      seen++;
    });
    assert(seen === 1, "io_uring layout: expected one NOP completion");
  }
}
