/**
 * io_uring kernel ABI (linux/io_uring.h) and liburing 2.3's `struct io_uring`
 * layout on x86-64. Offsets were taken with offsetof() against the installed
 * headers (docs/ublk.md §6); lib/uring/ring.ts checks them
 * against a live ring once at start-up.
 */

export const IORING_OP = {
  NOP: 0,
  FSYNC: 3,
  READ_FIXED: 4,
  WRITE_FIXED: 5,
  FALLOCATE: 17,
  READ: 22,
  WRITE: 23,
  URING_CMD: 46,
} as const;

export const IORING_SETUP = {
  CQSIZE: 0x8,
  COOP_TASKRUN: 0x100,
  SQE128: 0x400,
  CQE32: 0x800,
  SINGLE_ISSUER: 0x1000,
  DEFER_TASKRUN: 0x2000,
} as const;

/** Block-device io_uring commands (linux/blkdev.h, 6.12+): sqe->addr = offset, sqe->addr3 = length. */
export const BLOCK_URING_CMD_DISCARD = 0x1200;

/** SQE flags. */
export const IOSQE = { FIXED_FILE: 1, IO_DRAIN: 2, IO_LINK: 4, IO_HARDLINK: 8, ASYNC: 16 } as const;

export const IORING_FSYNC_DATASYNC = 1;
export const RWF_DSYNC = 0x2;

/** struct io_uring_sqe (64 bytes; 128 with SQE128, the tail being the command area). */
export const SQE = {
  size: 64,
  size128: 128,
  opcode: 0, // u8
  flags: 1, // u8
  ioprio: 2, // u16
  fd: 4, // s32
  off: 8, // u64 (cmd_op u32 @8 for URING_CMD)
  cmdOp: 8, // u32
  addr: 16, // u64
  len: 24, // u32
  rwFlags: 28, // u32 (fsync_flags, uring_cmd_flags)
  userData: 32, // u64
  bufIndex: 40, // u16
  personality: 42, // u16
  fileIndex: 44, // u32
  addr3: 48, // u64 (overlaps the command area)
  cmd: 48, // 16 bytes, or 80 with SQE128
} as const;

/** struct io_uring_cqe (16 bytes, no CQE32). */
export const CQE = { size: 16, userData: 0, res: 8, flags: 12 } as const;

/** struct io_uring_params (120 bytes). */
export const PARAMS = { size: 120, sqEntries: 0, cqEntries: 4, flags: 8, features: 20 } as const;

/** liburing 2.3 `struct io_uring` (216 bytes). */
export const RING = {
  size: 216,
  sq: {
    khead: 0,
    ktail: 8,
    kringMask: 16,
    kringEntries: 24,
    kflags: 32,
    kdropped: 40,
    array: 48,
    sqes: 56,
    sqeHead: 64, // u32, liburing's local
    sqeTail: 68, // u32, liburing's local
    ringSz: 72,
    ringPtr: 80,
    ringMask: 88, // u32
    ringEntries: 92, // u32
  },
  cq: {
    base: 104,
    khead: 104 + 0,
    ktail: 104 + 8,
    kringMask: 104 + 16,
    kringEntries: 104 + 24,
    kflags: 104 + 32,
    koverflow: 104 + 40,
    cqes: 104 + 48,
    ringMask: 104 + 72, // u32
    ringEntries: 104 + 76, // u32
  },
  flags: 192, // u32
  ringFd: 196, // s32
  features: 200, // u32
  enterRingFd: 204, // s32
} as const;
