/**
 * ublk kernel ABI (linux/ublk_cmd.h as shipped with Debian's 6.12 kernel);
 * what the values mean and what was verified: docs/ublk.md §1–§2.
 */
import { ERRNO } from "./errno.ts";

/** Control commands: ioctl-encoded (UBLK_U_CMD_*, 6.4+) and legacy (6.0+) numbers. */
export const UBLK_CMD = {
  GET_QUEUE_AFFINITY: { ioctl: 0x8020_7501, legacy: 0x01 },
  GET_DEV_INFO: { ioctl: 0x8020_7502, legacy: 0x02 },
  ADD_DEV: { ioctl: 0xc020_7504, legacy: 0x04 },
  DEL_DEV: { ioctl: 0xc020_7505, legacy: 0x05 },
  START_DEV: { ioctl: 0xc020_7506, legacy: 0x06 },
  STOP_DEV: { ioctl: 0xc020_7507, legacy: 0x07 },
  SET_PARAMS: { ioctl: 0xc020_7508, legacy: 0x08 },
  GET_PARAMS: { ioctl: 0x8020_7509, legacy: 0x09 },
  START_USER_RECOVERY: { ioctl: 0xc020_7510, legacy: 0x10 },
  END_USER_RECOVERY: { ioctl: 0xc020_7511, legacy: 0x11 },
  GET_FEATURES: { ioctl: 0x8020_7513, legacy: null },
  DEL_DEV_ASYNC: { ioctl: 0x8020_7514, legacy: null },
} as const;

export type UblkCtrlCmdName = keyof typeof UBLK_CMD;

/** Per-queue I/O commands. */
export const UBLK_IO = {
  FETCH_REQ: { ioctl: 0xc010_7520, legacy: 0x20 },
  COMMIT_AND_FETCH_REQ: { ioctl: 0xc010_7521, legacy: 0x21 },
  NEED_GET_DATA: { ioctl: 0xc010_7522, legacy: 0x22 },
} as const;

/** UBLK_F_* device flags. */
export const UBLK_F = {
  SUPPORT_ZERO_COPY: 1n << 0n,
  URING_CMD_COMP_IN_TASK: 1n << 1n,
  NEED_GET_DATA: 1n << 2n,
  USER_RECOVERY: 1n << 3n,
  USER_RECOVERY_REISSUE: 1n << 4n,
  UNPRIVILEGED_DEV: 1n << 5n,
  CMD_IOCTL_ENCODE: 1n << 6n,
  USER_COPY: 1n << 7n,
  ZONED: 1n << 8n,
  USER_RECOVERY_FAIL_IO: 1n << 9n,
} as const;

export const UBLK_FEATURE_NAMES: ReadonlyArray<[bigint, string]> = Object.entries(UBLK_F).map((
  [name, bit],
) => [bit, name.toLowerCase()]);

export const UBLK_IO_OP = {
  READ: 0,
  WRITE: 1,
  FLUSH: 2,
  DISCARD: 3,
  WRITE_SAME: 4,
  WRITE_ZEROES: 5,
} as const;

export const UBLK_IO_F = {
  FAILFAST_DEV: 1 << 8,
  FAILFAST_TRANSPORT: 1 << 9,
  FAILFAST_DRIVER: 1 << 10,
  META: 1 << 11,
  FUA: 1 << 13,
  NOUNMAP: 1 << 15,
  SWAP: 1 << 16,
} as const;

/** Completion result of every outstanding command after STOP_DEV or an abort. */
export const UBLK_IO_RES_ABORT = -ERRNO.ENODEV;
export const UBLK_IO_RES_OK = 0;
export const UBLK_IO_RES_NEED_GET_DATA = 1;

export const UBLK_DEV_STATE = { DEAD: 0, LIVE: 1, QUIESCED: 2, FAIL_IO: 3 } as const;

export const UBLK_MAX_QUEUE_DEPTH = 4096;
/** Descriptor area of queue q starts at q * round_up(4096 * 24, page). */
export const UBLK_DESC_QUEUE_STRIDE = 98_304;

/** struct ublksrv_ctrl_cmd (32 bytes, at SQE byte 48). */
export const CTRL_CMD = {
  size: 32,
  devId: 0, // u32
  queueId: 4, // u16
  len: 6, // u16
  addr: 8, // u64
  data0: 16, // u64
  devPathLen: 24, // u16
} as const;

/** struct ublksrv_ctrl_dev_info (64 bytes). */
export const DEV_INFO = {
  size: 64,
  nrHwQueues: 0, // u16
  queueDepth: 2, // u16
  state: 4, // u16
  maxIoBufBytes: 8, // u32
  devId: 12, // u32
  ublksrvPid: 16, // s32
  flags: 24, // u64
  ublksrvFlags: 32, // u64
  ownerUid: 40, // u32
  ownerGid: 44, // u32
} as const;

/** struct ublk_params (112 bytes on 6.12; the kernel copies min(len, its size)). */
export const PARAMS = {
  size: 112,
  len: 0, // u32
  types: 4, // u32
  basic: {
    base: 8,
    attrs: 8 + 0, // u32
    logicalBsShift: 8 + 4, // u8
    physicalBsShift: 8 + 5,
    ioOptShift: 8 + 6,
    ioMinShift: 8 + 7,
    maxSectors: 8 + 8, // u32
    chunkSectors: 8 + 12, // u32
    devSectors: 8 + 16, // u64
    virtBoundaryMask: 8 + 24, // u64
  },
  discard: {
    base: 40,
    discardAlignment: 40 + 0, // u32
    discardGranularity: 40 + 4, // u32
    maxDiscardSectors: 40 + 8, // u32
    maxWriteZeroesSectors: 40 + 12, // u32
    maxDiscardSegments: 40 + 16, // u16
  },
  devt: { base: 60, charMajor: 60, charMinor: 64, diskMajor: 68, diskMinor: 72 },
} as const;

export const UBLK_PARAM_TYPE = { BASIC: 1, DISCARD: 2, DEVT: 4, ZONED: 8 } as const;
export const UBLK_ATTR = { READ_ONLY: 1, ROTATIONAL: 2, VOLATILE_CACHE: 4, FUA: 8 } as const;

/** struct ublksrv_io_desc (24 bytes, kernel-written, mapped read-only). */
export const IO_DESC = {
  size: 24,
  opFlags: 0, // u32: op in the low 8 bits
  nrSectors: 4, // u32
  startSector: 8, // u64
  addr: 16, // u64
} as const;

/** struct ublksrv_io_cmd (16 bytes, at SQE byte 48). */
export const IO_CMD = { size: 16, qId: 0, tag: 2, result: 4, addr: 8 } as const;
