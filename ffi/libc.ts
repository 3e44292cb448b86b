/**
 * libc bindings: the system calls Deno does not expose (raw fds, mmap, ioctl,
 * prctl, unshare, eventfd, fallocate). Open with `openLibc()`; each worker opens
 * its own handle. Importing this module loads nothing.
 */
import { dlopenFirst } from "./load.ts";
import { ERRNO, ErrnoError } from "./errno.ts";

export const LIBC_SYMBOLS = {
  // int open(const char *path, int flags, mode_t mode)
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  // int close(int fd)
  close: { parameters: ["i32"], result: "i32" },
  // void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
  mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
  // int munmap(void *addr, size_t len)
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  // int posix_memalign(void **memptr, size_t alignment, size_t size)
  posix_memalign: { parameters: ["buffer", "usize", "usize"], result: "i32" },
  // void free(void *ptr)
  free: { parameters: ["pointer"], result: "void" },
  // int prctl(int option, unsigned long arg2, arg3, arg4, arg5)
  prctl: { parameters: ["i32", "u64", "u64", "u64", "u64"], result: "i32" },
  // int ioctl(int fd, unsigned long request, void *arg)
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // int *__errno_location(void)
  __errno_location: { parameters: [], result: "pointer" },
  // int unshare(int flags)
  unshare: { parameters: ["i32"], result: "i32" },
  // pid_t gettid(void)
  gettid: { parameters: [], result: "i32" },
  // int eventfd(unsigned int initval, int flags)
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  // int fallocate(int fd, int mode, off_t offset, off_t len)
  fallocate: { parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  // int fsync(int fd)
  fsync: { parameters: ["i32"], result: "i32" },
  // ssize_t pread(int fd, void *buf, size_t count, off_t offset)
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  // ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
  // void sync(void)
  sync: { parameters: [], result: "void" },
  // int execv(const char *path, char *const argv[])
  execv: { parameters: ["buffer", "buffer"], result: "i32" },
  // ssize_t write(int fd, const void *buf, size_t count)
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  // int flock(int fd, int operation)
  flock: { parameters: ["i32", "i32"], result: "i32" },
  // int umount2(const char *target, int flags)
  umount2: { parameters: ["buffer", "i32"], result: "i32" },
  // int fcntl(int fd, int cmd, long arg) (F_GETFL, F_SETFL: the third argument an int)
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" },
  // int sched_setaffinity(pid_t pid, size_t cpusetsize, const cpu_set_t *mask)
  sched_setaffinity: { parameters: ["i32", "usize", "buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

export type LibcSymbols = Deno.DynamicLibrary<typeof LIBC_SYMBOLS>["symbols"];

/** open(2) flags, x86-64. */
export const O = {
  RDONLY: 0,
  WRONLY: 1,
  RDWR: 2,
  CREAT: 0o100,
  EXCL: 0o200,
  TRUNC: 0o1000,
  NONBLOCK: 0o4000,
  DIRECT: 0o40000,
  DIRECTORY: 0o200000,
  CLOEXEC: 0o2000000,
  TMPFILE: 0o20200000, // includes O_DIRECTORY
} as const;

/** fcntl(2) commands. */
export const F = { GETFL: 3, SETFL: 4 } as const;
export const PROT = { READ: 1, WRITE: 2 } as const;
export const MAP = { SHARED: 1, PRIVATE: 2, ANONYMOUS: 0x20, POPULATE: 0x8000 } as const;
export const MAP_FAILED = 0xffff_ffff_ffff_ffffn;
/** umount2(2) flags. */
export const MNT_DETACH = 2;

/** flock(2) operations. */
export const LOCK = { EX: 2, NB: 4, UN: 8 } as const;
/** Filesystem freeze ioctls (linux/fs.h): _IOWR('X', 119/120, int). */
export const FS_IOC = { FIFREEZE: 0xc0045877n, FITHAW: 0xc0045878n } as const;
export const PR_SET_IO_FLUSHER = 57;
export const CLONE_NEWNS = 0x0002_0000;
export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const FALLOC_FL = { KEEP_SIZE: 0x01, PUNCH_HOLE: 0x02, ZERO_RANGE: 0x10 } as const;

/** Block-device ioctls (linux/fs.h). */
export const BLK = {
  BLKGETSIZE64: 0x8008_1272n, // _IOR(0x12, 114, size_t): u64 bytes
  BLKROGET: 0x125en, // _IO(0x12, 94), int: 1 when the device is read-only
  BLKSSZGET: 0x1268n, // int: logical block size
  BLKPBSZGET: 0x127bn, // unsigned int: physical block size
  BLKFLSBUF: 0x1261n,
  BLKDISCARD: 0x1277n, // u64[2]: offset, length
} as const;

/**
 * FIEMAP (linux/fiemap.h): a file's extents on its block device.
 * `struct fiemap` is a 32-byte header (u64 fm_start, u64 fm_length, u32 fm_flags,
 * u32 fm_mapped_extents, u32 fm_extent_count, u32 fm_reserved) followed by
 * fm_extent_count `struct fiemap_extent` of 56 bytes (u64 fe_logical,
 * u64 fe_physical, u64 fe_length, u64 fe_reserved64[2], u32 fe_flags,
 * u32 fe_reserved[3]).
 */
export const FIEMAP = {
  FS_IOC_FIEMAP: 0xc020_660bn, // _IOWR('f', 11, struct fiemap)
  HEADER_BYTES: 32,
  EXTENT_BYTES: 56,
  /** fm_length meaning "to the end of the file" (FIEMAP_MAX_OFFSET). */
  MAX_OFFSET: 0xffff_ffff_ffff_ffffn,
  /** fm_flags: write dirty pages (and delayed allocations) back first. */
  FLAG_SYNC: 0x1,
  /** fe_flags. */
  EXTENT_LAST: 0x1,
  EXTENT_UNKNOWN: 0x2,
  EXTENT_DELALLOC: 0x4,
  EXTENT_ENCODED: 0x8,
  EXTENT_DATA_ENCRYPTED: 0x80,
  EXTENT_NOT_ALIGNED: 0x100,
  EXTENT_DATA_INLINE: 0x200,
  EXTENT_DATA_TAIL: 0x400,
  EXTENT_UNWRITTEN: 0x800,
  EXTENT_MERGED: 0x1000,
  EXTENT_SHARED: 0x2000,
} as const;

/** A loaded libc with errno-checking helpers. */
export class Libc {
  readonly #lib: Deno.DynamicLibrary<typeof LIBC_SYMBOLS>;
  readonly sym: LibcSymbols;
  readonly #errnoView: Int32Array;

  constructor(lib: Deno.DynamicLibrary<typeof LIBC_SYMBOLS>) {
    this.#lib = lib;
    this.sym = lib.symbols;
    const loc = this.sym.__errno_location();
    if (loc === null) throw new Error("__errno_location() returned NULL");
    this.#errnoView = new Int32Array(Deno.UnsafePointerView.getArrayBuffer(loc, 4));
  }

  /** errno of the calling thread, read right after a failed call. */
  errno(): number {
    return this.#errnoView[0]!;
  }

  /** Throws an ErrnoError from errno when `ret` is negative; returns `ret` otherwise. */
  check(ret: number, call: string, detail?: string): number {
    if (ret < 0) throw new ErrnoError(call, this.errno(), detail);
    return ret;
  }

  open(path: string, flags: number, mode = 0): number {
    const fd = this.sym.open(cString(path), flags, mode);
    return this.check(fd, `open("${path}")`);
  }

  close(fd: number): void {
    this.check(this.sym.close(fd), `close(${fd})`);
  }

  /** Anonymous private mapping: page-aligned, zeroed, committed lazily. */
  mmapAnonymous(length: number): Deno.PointerObject {
    const ptr = this.sym.mmap(
      null,
      BigInt(length),
      PROT.READ | PROT.WRITE,
      MAP.PRIVATE | MAP.ANONYMOUS,
      -1,
      0n,
    );
    return this.#checkMap(ptr, `mmap(anonymous, ${length})`);
  }

  /** Shared mapping of a file or device at `offset`. */
  mmapShared(fd: number, length: number, offset: number, prot: number): Deno.PointerObject {
    const ptr = this.sym.mmap(
      null,
      BigInt(length),
      prot,
      MAP.SHARED | MAP.POPULATE,
      fd,
      BigInt(offset),
    );
    return this.#checkMap(ptr, `mmap(fd ${fd}, ${length} @ ${offset})`);
  }

  munmap(ptr: Deno.PointerObject, length: number): void {
    this.check(this.sym.munmap(ptr, BigInt(length)), "munmap");
  }

  /** posix_memalign: aligned C memory that the kernel may keep pointers to. Zeroed. */
  alignedAlloc(alignment: number, size: number): Deno.PointerObject {
    const out = new BigUint64Array(1);
    const rc = this.sym.posix_memalign(out, BigInt(alignment), BigInt(size));
    if (rc !== 0) throw new ErrnoError(`posix_memalign(${alignment}, ${size})`, rc);
    const ptr = Deno.UnsafePointer.create(out[0]!);
    if (ptr === null) throw new ErrnoError(`posix_memalign(${alignment}, ${size})`, ERRNO.ENOMEM);
    new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, size)).fill(0);
    return ptr;
  }

  free(ptr: Deno.PointerObject): void {
    this.sym.free(ptr);
  }

  /** ioctl that reads a u64 (or smaller, little-endian) out-parameter. */
  ioctlGetU64(fd: number, request: bigint, call: string): bigint {
    const out = new BigUint64Array(1);
    this.check(this.sym.ioctl(fd, request, out), call);
    return out[0]!;
  }

  ioctlGetU32(fd: number, request: bigint, call: string): number {
    const out = new Uint32Array(2);
    this.check(this.sym.ioctl(fd, request, out), call);
    return out[0]!;
  }

  unload(): void {
    this.#lib.close();
  }

  #checkMap(ptr: Deno.PointerValue, call: string): Deno.PointerObject {
    const value = ptr === null ? 0n : BigInt(Deno.UnsafePointer.value(ptr));
    if (ptr === null || value === MAP_FAILED) throw new ErrnoError(call, this.errno());
    return ptr;
  }
}

export function openLibc(): Libc {
  const lib = dlopenFirst("libc6", "BLKSNAP_LIBC", ["libc.so.6"], LIBC_SYMBOLS);
  return new Libc(lib);
}

const encoder = new TextEncoder();

/** NUL-terminated UTF-8 copy of `s` for a `const char *` parameter. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  if (s.includes("\0")) throw new TypeError(`Path contains a NUL byte: ${JSON.stringify(s)}`);
  const bytes = new Uint8Array(s.length * 3 + 1);
  const { written } = encoder.encodeInto(s, bytes);
  return bytes.subarray(0, written + 1);
}
