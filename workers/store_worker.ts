/**
 * Entry point of a snapshot's chunk store-queue worker (lib/pipeline/store_worker.ts):
 * one per taken snapshot. It receives one `StoreWorkerInit`, reports `ready`,
 * stores chunks until the daemon sets STOP, then reports `exited`.
 */
import { runStoreWorker } from "../lib/pipeline/store_worker.ts";

runStoreWorker(self as unknown as Worker);
