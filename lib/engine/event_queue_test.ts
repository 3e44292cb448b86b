import { assertEquals } from "./_assert.ts";
import { EVENT_QUEUE_CAPACITY, EventQueue, type SnapshotEvent } from "./event_queue.ts";

function noSpace(requestedSectors: number): SnapshotEvent {
  return { code: "no_space", timeMs: 0, requestedSectors };
}

Deno.test("EventQueue.wait() returns queued events in order", async () => {
  const queue = new EventQueue();
  queue.push(noSpace(1));
  queue.push(noSpace(2));
  assertEquals(await queue.wait(0), noSpace(1));
  assertEquals(await queue.wait(10), noSpace(2));
  assertEquals(queue.length, 0);
});

Deno.test("EventQueue.wait() returns null after the timeout", async () => {
  const queue = new EventQueue();
  const start = performance.now();
  assertEquals(await queue.wait(20), null);
  assertEquals(performance.now() - start >= 15, true);
  assertEquals(await queue.wait(0), null);
});

Deno.test("EventQueue.push() wakes a waiter at once", async () => {
  const queue = new EventQueue();
  const waiting = queue.wait(10_000);
  queue.push(noSpace(3));
  assertEquals(await waiting, noSpace(3));
  assertEquals(queue.length, 0);
});

Deno.test("EventQueue.close() wakes waiters with null and drops events", async () => {
  const queue = new EventQueue();
  const waiting = queue.wait(10_000);
  queue.close();
  assertEquals(await waiting, null);
  queue.push(noSpace(1));
  assertEquals(await queue.wait(0), null);
});

Deno.test("EventQueue keeps at most EVENT_QUEUE_CAPACITY events, dropping the oldest", async () => {
  const queue = new EventQueue();
  for (let i = 0; i < EVENT_QUEUE_CAPACITY + 5; i++) queue.push(noSpace(i));
  assertEquals(queue.length, EVENT_QUEUE_CAPACITY);
  assertEquals(queue.dropped, 5);
  assertEquals(await queue.wait(0), noSpace(5));
});
