/**
 * Entry point of a ublk queue worker: one per hardware queue of each device.
 * It receives one `QueueWorkerInit` message, sets the queue up, reports
 * `ready` once every tag has a FETCH queued, serves I/O until the device
 * stops, then reports `exited`. A failure is reported as `fatal`; the daemon
 * then stops the device.
 */
import { runQueueWorker } from "../lib/ublk/queue_worker.ts";

runQueueWorker(self as unknown as Worker);
