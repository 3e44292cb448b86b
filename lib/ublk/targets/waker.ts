/**
 * Waking another worker that sleeps in its io_uring: it keeps a read of its
 * eventfd armed, and a write of 8 bytes here completes that read.
 */
import type { Libc } from "../../../ffi/libc.ts";
import { CTL } from "../../pipeline/device_ctl.ts";

export class Waker {
  readonly #libc: Libc;
  readonly #one = new BigUint64Array([1n]);
  readonly #bytes: Uint8Array<ArrayBuffer>;

  constructor(libc: Libc) {
    this.#libc = libc;
    this.#bytes = new Uint8Array(this.#one.buffer);
  }

  /** Wakes the worker reading eventfd `fd` (nothing for -1). */
  wake(fd: number): void {
    if (fd < 0) return;
    // EAGAIN (counter at its maximum) still leaves the reader woken.
    this.#libc.sym.write(fd, this.#bytes, 8n);
  }
}

/** Wakes every queue of a device, tracked and image, whose eventfds the control block lists. */
export function wakeAll(waker: Waker, ctl: { w: Int32Array }): void {
  const w = ctl.w;
  const queues = Atomics.load(w, CTL.QUEUES);
  for (let i = 0; i < queues; i++) waker.wake(Atomics.load(w, CTL.QUEUE_EFD + i));
  const images = Atomics.load(w, CTL.IMAGE_QUEUES);
  for (let i = 0; i < images; i++) waker.wake(Atomics.load(w, CTL.IMAGE_EFD + i));
}
