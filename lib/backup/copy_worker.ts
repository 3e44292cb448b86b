/**
 * The work of a backup copy worker (workers/backup_worker.ts is its entry
 * point): it reads a piece of the source with its own file descriptor, finds
 * its clusters of zeroes, deflates the others when asked, and hashes each
 * run of stored clusters (an extent of the manifest). The main thread only
 * hands out pieces and appends the results to the qcow2 file in order.
 *
 * Messages are structured clones with their ArrayBuffers transferred, not
 * copied; this is the backup's path, not a device's I/O path.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { compressCluster, isZero } from "./qcow2.ts";
import type { Extent } from "./manifest.ts";

/** What a cluster of a piece became. */
export const KIND_ZERO = 0;
export const KIND_DATA = 1;
export const KIND_COMPRESSED = 2;

export type CopyRequest =
  | { type: "open"; path: string }
  | {
    type: "piece";
    seq: number;
    start: number;
    end: number;
    clusterBytes: number;
    compress: boolean;
    /** A buffer to read into (at least end - start bytes), or null for a new one. */
    buf: ArrayBuffer | null;
  }
  | { type: "close" };

export type CopyReply =
  | {
    seq: number;
    /** The piece's bytes, read into `buf` (transferred). */
    buf: ArrayBuffer;
    /** One kind per cluster of the piece. */
    kinds: Uint8Array;
    /** The compressed clusters' bytes, back to back, with their lengths. */
    packed: ArrayBuffer;
    packedLengths: Uint32Array;
    /** Runs of stored clusters (data or compressed), with their sha256. */
    extents: Extent[];
  }
  | { seq: number; error: string; code: string };

/** The state of one worker: the source it reads. */
export class CopyWork {
  #file: Deno.FsFile | null = null;
  #path = "";
  #openError = "no source is open";

  /** Opens `path`; a failure is reported by the next piece. */
  open(path: string): void {
    this.close();
    this.#path = path;
    try {
      this.#file = Deno.openSync(path, { read: true });
    } catch (err) {
      this.#openError = `Cannot open the source ${path}: ${(err as Error).message}`;
    }
  }

  close(): void {
    this.#file?.close();
    this.#file = null;
  }

  /** Does one piece; returns the reply and the buffers to transfer with it. */
  piece(req: Extract<CopyRequest, { type: "piece" }>): [CopyReply, ArrayBuffer[]] {
    const { seq, start, end, clusterBytes: cb, compress } = req;
    try {
      if (this.#file === null) return [{ seq, error: this.#openError, code: "ENOENT" }, []];
      const length = end - start;
      const buf = req.buf !== null && req.buf.byteLength >= length
        ? req.buf
        : new ArrayBuffer(length);
      const data = new Uint8Array(buf, 0, length);
      this.#file.seekSync(start, Deno.SeekMode.Start);
      let got = 0;
      while (got < length) {
        const n = this.#file.readSync(data.subarray(got));
        if (n === null || n === 0) break;
        got += n;
      }
      if (got !== length) {
        return [{
          seq,
          error: `Short read of ${this.#path} at ${start}: ${got} of ${length} bytes`,
          code: "EIO",
        }, [buf]];
      }
      const count = Math.ceil(length / cb);
      const kinds = new Uint8Array(count);
      const packedLengths = new Uint32Array(count);
      const packs: Uint8Array[] = [];
      let packedBytes = 0;
      const extents: Extent[] = [];
      let run: { offset: number; length: number; hash: ReturnType<typeof createHash> } | null =
        null;
      const endRun = () => {
        if (run === null) return;
        extents.push({ offset: run.offset, length: run.length, sha256: run.hash.digest("hex") });
        run = null;
      };
      for (let i = 0; i < count; i++) {
        const cluster = data.subarray(i * cb, Math.min(length, (i + 1) * cb));
        if (isZero(cluster)) {
          kinds[i] = KIND_ZERO;
          endRun();
          continue;
        }
        const packed = compress ? compressCluster(cluster, cb) : null;
        if (packed !== null) {
          kinds[i] = KIND_COMPRESSED;
          packedLengths[i] = packed.length;
          packs.push(packed);
          packedBytes += packed.length;
        } else {
          kinds[i] = KIND_DATA;
        }
        run ??= { offset: start + i * cb, length: 0, hash: createHash("sha256") };
        run.hash.update(cluster);
        run.length += cluster.length;
      }
      endRun();
      const packed = new Uint8Array(packedBytes);
      let at = 0;
      for (const p of packs) {
        packed.set(p, at);
        at += p.length;
      }
      return [
        { seq, buf, kinds, packed: packed.buffer, packedLengths, extents },
        [buf, packed.buffer, kinds.buffer, packedLengths.buffer],
      ];
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      return [{
        seq,
        error: `Reading ${this.#path} at ${start}: ${(err as Error).message}`,
        code: typeof code === "string" && /^E[A-Z0-9]+$/.test(code) ? code : "EIO",
      }, []];
    }
  }
}

/** Serves CopyRequests on `scope` (a worker's self) until "close". */
export function runCopyWorker(scope: Worker): void {
  const work = new CopyWork();
  scope.onmessage = (e: MessageEvent<CopyRequest>) => {
    const req = e.data;
    if (req.type === "open") {
      work.open(req.path);
    } else if (req.type === "piece") {
      const [reply, transfer] = work.piece(req);
      scope.postMessage(reply, transfer);
    } else {
      work.close();
      self.close();
    }
  };
}
