/**
 * The control commands the kernel still holds, each with its own payload
 * buffer.
 *
 * The kernel writes a command's answer (dev_info, features) into the buffer
 * named by the SQE when the command completes, which may be long after the
 * caller stopped waiting. So a buffer belongs to one command and is freed only
 * once that command's CQE has arrived:
 *
 *   begin()  -> waiting  --answer()--> answered --finish()--> freed
 *                  |
 *                  +--abandon() (timeout)--> abandoned --answer()--> freed
 *
 * A command whose CQE never comes keeps its buffer: close() frees the others
 * and reports how many it had to leave to the kernel.
 *
 * Pure bookkeeping over an allocator, so it is tested without FFI.
 */
import { assert } from "../assert.ts";
import { packUserData, UD_KIND } from "../uring/user_data.ts";

/** Where the buffers come from: C memory in the daemon, ArrayBuffers in tests. */
export interface BufferAllocator<B> {
  alloc(): B;
  free(buffer: B): void;
}

/** What answer() found for a CQE. */
export type Answered = "answered" | "late" | "unknown";

interface Entry<B> {
  buffer: B;
  res: number | undefined;
  abandoned: boolean;
}

const SEQ_MASK = 0xffff;

export class ControlCommands<B> {
  readonly #allocator: BufferAllocator<B>;
  readonly #byUserData = new Map<number, Entry<B>>();
  #seq = 0;
  #closed = false;

  constructor(allocator: BufferAllocator<B>) {
    this.#allocator = allocator;
  }

  /** Commands whose buffer is still allocated (waiting, answered or abandoned). */
  get live(): number {
    return this.#byUserData.size;
  }

  /** Commands given up on whose answer has not come yet. */
  get abandoned(): number {
    let n = 0;
    for (const e of this.#byUserData.values()) if (e.abandoned) n++;
    return n;
  }

  /** A fresh buffer and a user_data no live command uses. */
  begin(): { userData: number; buffer: B } {
    assert(!this.#closed, "ControlCommands used after close()");
    assert(this.#byUserData.size <= SEQ_MASK, "every control-command number is in use");
    let userData: number;
    do {
      this.#seq = (this.#seq + 1) & SEQ_MASK;
      userData = packUserData(UD_KIND.CTRL, this.#seq);
    } while (this.#byUserData.has(userData));
    const buffer = this.#allocator.alloc();
    this.#byUserData.set(userData, { buffer, res: undefined, abandoned: false });
    return { userData, buffer };
  }

  /**
   * Records the CQE of `userData`. The answer of an abandoned command frees
   * its buffer ("late"); one that matches no command is "unknown".
   */
  answer(userData: number, res: number): Answered {
    const e = this.#byUserData.get(userData);
    if (!e) return "unknown";
    assert(e.res === undefined, "a control command answered twice");
    if (e.abandoned) {
      this.#byUserData.delete(userData);
      this.#allocator.free(e.buffer);
      return "late";
    }
    e.res = res;
    return "answered";
  }

  /** The command's result once answered, else undefined. */
  result(userData: number): number | undefined {
    return this.#byUserData.get(userData)?.res;
  }

  /**
   * The caller is done with the buffer: the command was answered (and its
   * buffer read), or never reached the kernel.
   */
  finish(userData: number): void {
    const e = this.#byUserData.get(userData);
    assert(e !== undefined && !e.abandoned, "finish() of a command that is not waiting");
    this.#byUserData.delete(userData);
    this.#allocator.free(e.buffer);
  }

  /**
   * The caller stops waiting (timeout, or the submit failed after the SQE was
   * written): the kernel may still write the buffer, so it is kept until
   * the answer comes. An answered command is freed at once.
   */
  abandon(userData: number): void {
    const e = this.#byUserData.get(userData);
    assert(e !== undefined && !e.abandoned, "abandon() of a command that is not waiting");
    if (e.res !== undefined) {
      this.finish(userData);
      return;
    }
    e.abandoned = true;
  }

  /**
   * Frees every buffer the kernel no longer holds; returns how many buffers
   * of unanswered commands are left allocated (never freed under a kernel
   * write: the ring's teardown may complete them later).
   */
  close(): number {
    if (this.#closed) return 0;
    this.#closed = true;
    let leaked = 0;
    for (const [userData, e] of this.#byUserData) {
      if (e.res === undefined) {
        leaked++;
        continue;
      }
      this.#byUserData.delete(userData);
      this.#allocator.free(e.buffer);
    }
    return leaked;
  }
}
