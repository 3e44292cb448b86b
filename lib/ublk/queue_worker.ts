/**
 * The worker-side half of a queue: message protocol between the daemon and a
 * queue worker, and the worker's life cycle.
 */
import { openLibc } from "../../ffi/libc.ts";
import { openLiburing } from "../../ffi/liburing.ts";
import { UblkQueue } from "./queue.ts";
import { PassthroughTarget } from "./targets/passthrough.ts";
import type { UblkTarget } from "./target.ts";
import { type DeviceShared, TrackedTarget } from "./targets/tracked.ts";
import { ImageTarget } from "./targets/image.ts";
import { Waker } from "./targets/waker.ts";
import type { Libc } from "../../ffi/libc.ts";

export type TargetSpec =
  | { kind: "passthrough"; originalFd: number }
  | { kind: "tracked"; originalFd: number; device: DeviceShared; wakeFds: number[] }
  | {
    kind: "image";
    originalFd: number;
    storageFd: number;
    device: DeviceShared;
    wakeFds: number[];
  };

export interface QueueWorkerInit {
  type: "init";
  devId: number;
  qId: number;
  depth: number;
  maxIoBufBytes: number;
  charFd: number;
  useIoctl: boolean;
  stats: SharedArrayBuffer;
  target: TargetSpec;
}

export type QueueWorkerReport =
  | { type: "ready"; qId: number; tid: number }
  | { type: "exited"; qId: number; served: number }
  | { type: "fatal"; qId: number; message: string };

function makeTarget(
  libc: Libc,
  spec: TargetSpec,
  depth: number,
  qId: number,
): { target: UblkTarget; fds: number[]; wakeFd: number } {
  switch (spec.kind) {
    case "passthrough":
      return { target: new PassthroughTarget(depth), fds: [spec.originalFd], wakeFd: -1 };
    case "tracked": {
      const d = spec.device;
      const shared = { ...d, storeRing: d.trackedRings[qId]! };
      return {
        target: new TrackedTarget(depth, shared, new Waker(libc)),
        fds: [spec.originalFd],
        wakeFd: spec.wakeFds[qId]!,
      };
    }
    case "image": {
      const d = spec.device;
      const shared = { ...d, storeRing: d.imageRings[qId]! };
      return {
        target: new ImageTarget(depth, shared, new Waker(libc)),
        fds: [spec.originalFd, spec.storageFd],
        wakeFd: spec.wakeFds[qId]!,
      };
    }
  }
}

/**
 * An experiment (BLKSNAP_QUEUE_AFFINITY=1): pins the queue's thread to CPU
 * qId modulo the CPU count, where blk-mq's default map sends the requests of
 * that CPU (so the driver's task work runs where its I/O was issued). Off by
 * default until a benchmark shows it pays.
 */
function pinToCpu(libc: Libc, qId: number): void {
  if (Deno.env.get("BLKSNAP_QUEUE_AFFINITY") !== "1") return;
  const cpus = navigator.hardwareConcurrency;
  const mask = new Uint8Array(128); // cpu_set_t: 1024 bits
  const cpu = qId % cpus;
  mask[cpu >> 3] = 1 << (cpu & 7);
  libc.check(libc.sym.sched_setaffinity(0, BigInt(mask.length), mask), "sched_setaffinity");
}

/** Installs the message handler of a queue worker (`self` inside the worker). */
export function runQueueWorker(self: Worker): void {
  self.onmessage = (ev: MessageEvent<QueueWorkerInit>) => {
    const init = ev.data;
    self.onmessage = null;
    const post = (r: QueueWorkerReport) => self.postMessage(r);
    let queue: UblkQueue | undefined;
    try {
      const libc = openLibc();
      const uring = openLiburing();
      const { target, fds, wakeFd } = makeTarget(libc, init.target, init.depth, init.qId);
      pinToCpu(libc, init.qId);
      queue = new UblkQueue(libc, uring.symbols, { ...init, targetFds: fds, wakeFd }, target);
      queue.fetchAll();
      post({ type: "ready", qId: init.qId, tid: libc.sym.gettid() });
      queue.run();
      const served = queue.served;
      queue.close();
      post({ type: "exited", qId: init.qId, served });
    } catch (err) {
      // Close the ring: io_uring cancels the queue's outstanding commands, so the
      // kernel fails or requeues its requests and STOP_DEV can finish. A ring left
      // open would hold them for ever (docs/ublk.md §3).
      try {
        queue?.close();
      } catch (closeErr) {
        console.error(`blksnap: closing ublk queue ${init.qId} after a failure: ${closeErr}`);
      }
      post({
        type: "fatal",
        qId: init.qId,
        message: err instanceof Error ? (err.stack ?? err.message) : String(err),
      });
    }
  };
}
