/**
 * A tracked device's CBT map in a file beside the socket
 * (`/run/blksnap/control.cbt-7-0` for original 7:0), mapped shared by the
 * daemon and, by address, by its queue workers (CbtMap.overMemory). Every
 * mark lands in the file's pages as it is made, before the write it marks is
 * sent to the original: a daemon killed at any point leaves a map that may
 * over-mark but never misses a write, and the next daemon maps the same file
 * and keeps the map and its generation id. tmpfs: a reboot forgets it, as
 * the module's maps are forgotten.
 *
 * A file that does not hold a usable map of the device's geometry (a switch
 * cut short, other parameters) is reset with a new generation id, so a
 * backup tool takes a full backup rather than a wrong incremental one.
 */
import { type Libc, O, PROT } from "../../ffi/libc.ts";
import { cbtGeometry, CbtMap, cbtMapBytes } from "../engine/cbt_map.ts";
import type { Params } from "../engine/params.ts";
import { addressOf } from "../uring/ring.ts";

/** `/run/blksnap/control.state` + "7:0" -> `/run/blksnap/control.cbt-7-0`. */
export function cbtFilePath(statePath: string, originalDevice: string): string {
  return `${statePath.replace(/\.state$/, "")}.cbt-${originalDevice.replace(":", "-")}`;
}

export class CbtFile {
  readonly path: string;
  readonly map: CbtMap;
  /** Why an existing file was not kept (null: kept, or there was none to keep). */
  readonly resetReason: string | null;
  readonly #libc: Libc;
  #ptr: Deno.PointerObject | null;
  readonly #bytes: number;

  private constructor(
    libc: Libc,
    path: string,
    ptr: Deno.PointerObject,
    bytes: number,
    map: CbtMap,
    resetReason: string | null,
  ) {
    this.#libc = libc;
    this.path = path;
    this.#ptr = ptr;
    this.#bytes = bytes;
    this.map = map;
    this.resetReason = resetReason;
  }

  /**
   * Maps the map file at `path`: a new map when `reuse` is false or the file
   * cannot be kept (resetReason says why), the file's map otherwise.
   */
  static open(
    libc: Libc,
    path: string,
    geometry: { capacitySectors: number; params: Params; reuse: boolean },
  ): CbtFile {
    const { blockCount } = cbtGeometry(geometry.capacitySectors, geometry.params);
    const bytes = cbtMapBytes(blockCount);
    let resetReason: string | null = null;
    let size = -1;
    try {
      const st = Deno.statSync(path);
      if (st.isFile) size = st.size;
    } catch {
      size = -1;
    }
    if (geometry.reuse) {
      if (size < 0) resetReason = "its file is gone";
      else if (size !== bytes) resetReason = "its size does not match the device";
      else {
        const kept = CbtFile.#map(libc, path, bytes);
        const why = CbtMap.check(kept.memory, geometry);
        if (why === null) {
          const map = CbtMap.overMemory(addressOf(kept.ptr), bytes, {
            capacitySectors: geometry.capacitySectors,
            params: geometry.params,
            fresh: false,
          });
          return new CbtFile(libc, path, kept.ptr, bytes, map, null);
        }
        libc.munmap(kept.ptr, bytes);
        resetReason = why;
      }
    }
    const f = Deno.openSync(path, { read: true, write: true, create: true, mode: 0o600 });
    try {
      f.truncateSync(0);
      f.truncateSync(bytes);
    } finally {
      f.close();
    }
    const fresh = CbtFile.#map(libc, path, bytes);
    const map = CbtMap.overMemory(addressOf(fresh.ptr), bytes, {
      capacitySectors: geometry.capacitySectors,
      params: geometry.params,
      fresh: true,
    });
    return new CbtFile(libc, path, fresh.ptr, bytes, map, resetReason);
  }

  static #map(
    libc: Libc,
    path: string,
    bytes: number,
  ): { ptr: Deno.PointerObject; memory: ArrayBuffer } {
    const fd = libc.open(path, O.RDWR | O.CLOEXEC);
    try {
      const ptr = libc.mmapShared(fd, bytes, 0, PROT.READ | PROT.WRITE);
      return { ptr, memory: Deno.UnsafePointerView.getArrayBuffer(ptr, bytes) };
    } finally {
      libc.close(fd);
    }
  }

  /** Unmaps it, keeping the file (for the next daemon). Only once no worker views it. */
  close(): void {
    if (this.#ptr === null) return;
    this.#libc.munmap(this.#ptr, this.#bytes);
    this.#ptr = null;
  }

  /** Unmaps it and deletes the file (the device is detached). */
  remove(): void {
    this.close();
    try {
      Deno.removeSync(this.path);
    } catch {
      // gone already
    }
  }
}
