/**
 * liburing 2.3 bindings (Debian bookworm's liburing2). 2.3 has no liburing-ffi:
 * every `io_uring_prep_*`, `io_uring_cqe_seen` and `io_uring_cq_advance` is an
 * inline function, so lib/uring/ring.ts fills SQEs and moves the CQ head itself.
 * Open with `openLiburing()`; each worker opens its own handle.
 */
import { dlopenFirst } from "./load.ts";

export const LIBURING_SYMBOLS = {
  // int io_uring_queue_init_params(unsigned entries, struct io_uring *ring, struct io_uring_params *p)
  io_uring_queue_init_params: { parameters: ["u32", "pointer", "pointer"], result: "i32" },
  // void io_uring_queue_exit(struct io_uring *ring)
  io_uring_queue_exit: { parameters: ["pointer"], result: "void" },
  // struct io_uring_sqe *io_uring_get_sqe(struct io_uring *ring)
  io_uring_get_sqe: { parameters: ["pointer"], result: "pointer" },
  // int io_uring_submit(struct io_uring *ring)
  io_uring_submit: { parameters: ["pointer"], result: "i32" },
  // int io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr)
  io_uring_submit_and_wait: { parameters: ["pointer", "u32"], result: "i32" },
  // int io_uring_submit_and_wait_timeout(struct io_uring *ring, struct io_uring_cqe **cqe_ptr,
  //     unsigned wait_nr, struct __kernel_timespec *ts, sigset_t *sigmask)
  io_uring_submit_and_wait_timeout: {
    parameters: ["pointer", "buffer", "u32", "buffer", "pointer"],
    result: "i32",
  },
  // int io_uring_get_events(struct io_uring *ring)
  io_uring_get_events: { parameters: ["pointer"], result: "i32" },
  // int io_uring_register_files(struct io_uring *ring, const int *files, unsigned nr_files)
  io_uring_register_files: { parameters: ["pointer", "buffer", "u32"], result: "i32" },
  // int io_uring_register_buffers(struct io_uring *ring, const struct iovec *iovecs, unsigned nr)
  io_uring_register_buffers: { parameters: ["pointer", "buffer", "u32"], result: "i32" },
  // int io_uring_register_ring_fd(struct io_uring *ring)
  io_uring_register_ring_fd: { parameters: ["pointer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

export type LiburingSymbols = Deno.DynamicLibrary<typeof LIBURING_SYMBOLS>["symbols"];

export function openLiburing(): Deno.DynamicLibrary<typeof LIBURING_SYMBOLS> {
  return dlopenFirst(
    "liburing2",
    "BLKSNAP_LIBURING",
    ["liburing.so.2", "/usr/lib/x86_64-linux-gnu/liburing.so.2", "/usr/lib/liburing.so.2"],
    LIBURING_SYMBOLS,
  );
}
