/**
 * Extents: the runs of consecutive clusters a point stores, each with the
 * sha256 of its content, as the manifest records them.
 *
 * @module
 */
import { createHash, type Hash } from "node:crypto";
import type { Extent } from "./manifest.ts";

/** The most one extent's checksum covers. */
export const EXTENT_MAX_BYTES = 32 * 1024 * 1024;

/** Builds the extents (runs of stored clusters) and their checksums. */
export class ExtentBuilder {
  readonly extents: Extent[] = [];
  #offset = -1;
  #length = 0;
  #hash: Hash | null = null;

  /** `data` is the content at `offset`, a cluster this point stores. */
  add(offset: number, data: Uint8Array): void {
    if (
      this.#hash === null || this.#offset + this.#length !== offset ||
      this.#length + data.length > EXTENT_MAX_BYTES
    ) {
      this.flush();
      this.#offset = offset;
      this.#length = 0;
      this.#hash = createHash("sha256");
    }
    this.#hash!.update(data);
    this.#length += data.length;
  }

  flush(): void {
    if (this.#hash === null) return;
    this.extents.push({
      offset: this.#offset,
      length: this.#length,
      sha256: this.#hash.digest("hex"),
    });
    this.#hash = null;
  }
}
