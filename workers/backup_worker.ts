/**
 * Entry point of a backup copy worker (lib/backup/copy_worker.ts): a pool of
 * them reads, checks, compresses and hashes the pieces of a backup.
 */
import { runCopyWorker } from "../lib/backup/copy_worker.ts";

runCopyWorker(self as unknown as Worker);
