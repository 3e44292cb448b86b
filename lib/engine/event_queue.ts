/**
 * Events of a snapshot for userspace (the module's `event_queue`):
 * `corrupted` when the snapshot can no longer serve its images, `no_space`
 * when the difference storage needs more room and cannot grow.
 *
 * @module
 */

import { assert } from "./errors.ts";

/** Event codes as numbered by the module's UAPI (`enum blksnap_event_codes`). */
export const EVENT_CODES = { corrupted: 0, no_space: 1 } as const;

/** The snapshot of a device became unusable (`struct blksnap_event_corrupted`). */
export interface CorruptedEvent {
  readonly code: "corrupted";
  /** Wall-clock time of the event, in ms since the epoch. */
  readonly timeMs: number;
  /** The original device's identity ("MAJ:MIN"). */
  readonly deviceId: string;
  /** Positive errno, e.g. 28 (ENOSPC) for an overflow. */
  readonly errorCode: number;
}

/** The difference storage is low and may not grow (`struct blksnap_event_no_space`). */
export interface NoSpaceEvent {
  readonly code: "no_space";
  readonly timeMs: number;
  /** Sectors the storage wanted to grow by. */
  readonly requestedSectors: number;
}

export type SnapshotEvent = CorruptedEvent | NoSpaceEvent;

/** The most events kept unread; older ones are dropped first. */
export const EVENT_QUEUE_CAPACITY = 1024;

/** A bounded FIFO of events with timed waits. */
export class EventQueue {
  readonly #events: SnapshotEvent[] = [];
  readonly #waiters = new Set<(event: SnapshotEvent | null) => void>();
  #closed = false;
  #dropped = 0;

  /** Unread events. */
  get length(): number {
    return this.#events.length;
  }
  /** Events lost because the queue was full. */
  get dropped(): number {
    return this.#dropped;
  }

  /** Adds an event, handing it straight to the oldest waiter if there is one. */
  push(event: SnapshotEvent): void {
    if (this.#closed) return;
    const waiter = this.#waiters.values().next();
    if (!waiter.done) {
      assert(this.#events.length === 0, "A waiter waits while events are queued");
      this.#waiters.delete(waiter.value);
      waiter.value(event);
      return;
    }
    if (this.#events.length === EVENT_QUEUE_CAPACITY) {
      this.#events.shift();
      this.#dropped++;
    }
    this.#events.push(event);
  }

  /** Takes the oldest event, waiting up to `timeoutMs`; null on timeout or close. */
  wait(timeoutMs: number): Promise<SnapshotEvent | null> {
    assert(Number.isFinite(timeoutMs) && timeoutMs >= 0, `Bad timeout ${timeoutMs}`);
    const event = this.#events.shift();
    if (event !== undefined) return Promise.resolve(event);
    if (this.#closed || timeoutMs === 0) return Promise.resolve(null);
    return new Promise((resolve) => {
      const waiter = (value: SnapshotEvent | null) => {
        clearTimeout(timer);
        resolve(value);
      };
      const timer = setTimeout(() => {
        this.#waiters.delete(waiter);
        resolve(null);
      }, timeoutMs);
      this.#waiters.add(waiter);
    });
  }

  /** Drops the events and wakes every waiter with null. */
  close(): void {
    this.#closed = true;
    this.#events.length = 0;
    for (const waiter of this.#waiters) waiter(null);
    this.#waiters.clear();
  }
}
