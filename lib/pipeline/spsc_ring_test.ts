import { assertEquals, assertThrows, assertTrue } from "../engine/_assert.ts";
import { AssertionError } from "../assert.ts";
import { SpscRing, spscRingBytes } from "./spsc_ring.ts";

/** Int32 word indexes of head and tail, from the layout in the module header. */
const HEAD_WORD = 0;
const TAIL_WORD = 16;

/** Sets both counters to `value` (an empty ring whose counters are about to wrap). */
function setCounters(ring: SpscRing, value: number): void {
  const w = new Int32Array(ring.shared);
  w[HEAD_WORD] = value;
  w[TAIL_WORD] = value;
}

Deno.test("SpscRing.create() rounds the capacity up to a power of two", () => {
  assertEquals(SpscRing.create(5, 2).capacity, 8);
  assertEquals(SpscRing.create(8, 2).capacity, 8);
  assertEquals(SpscRing.create(0, 1).capacity, 1);
  const ring = SpscRing.create(3, 3);
  assertEquals(ring.recordSlots, 3);
  assertEquals(ring.shared.byteLength, spscRingBytes(4, 3));
  assertEquals(spscRingBytes(4, 3), 192 + 4 * 3 * 8);
});

Deno.test("SpscRing.pop() is false on an empty ring and leaves `out` alone", () => {
  const ring = SpscRing.create(4, 2);
  const out = [7, 7];
  assertEquals(ring.pop(out), false);
  assertEquals(out, [7, 7]);
  assertEquals(ring.length, 0);
});

Deno.test("SpscRing gives records back in order, with every slot and exact integers", () => {
  const ring = SpscRing.create(4, 4);
  assertTrue(ring.push(1, 2, 3, 4));
  assertTrue(ring.push(2 ** 53 - 1, -5, 0.5, 2 ** 40));
  assertEquals(ring.length, 2);
  const out = new Float64Array(4);
  assertTrue(ring.pop(out));
  assertEquals(Array.from(out), [1, 2, 3, 4]);
  assertTrue(ring.pop(out));
  assertEquals(Array.from(out), [2 ** 53 - 1, -5, 0.5, 2 ** 40]);
  assertEquals(ring.pop(out), false);
});

Deno.test("SpscRing.push() is false on a full ring until the consumer frees a slot", () => {
  const ring = SpscRing.create(4, 1);
  for (let i = 0; i < 4; i++) assertTrue(ring.push(i));
  assertEquals(ring.push(99), false);
  assertEquals(ring.length, 4);
  const out = [0];
  assertTrue(ring.pop(out));
  assertEquals(out[0], 0);
  assertTrue(ring.push(4));
  assertEquals(ring.push(5), false);
  const popped: number[] = [];
  while (ring.pop(out)) popped.push(out[0]!);
  assertEquals(popped, [1, 2, 3, 4], "the refused record was never stored");
});

Deno.test("SpscRing.push() writes only the record's own slots", () => {
  const ring = SpscRing.create(2, 2);
  assertTrue(ring.push(10, 11, 12, 13)); // c and d do not fit a two-slot record
  assertTrue(ring.push(20, 21));
  const out = [0, 0];
  assertTrue(ring.pop(out));
  assertEquals(out, [10, 11]);
  assertTrue(ring.pop(out));
  assertEquals(out, [20, 21]);
});

Deno.test("SpscRing counters wrap from 2^31 - 1 to -2^31 without losing a record", () => {
  const ring = SpscRing.create(4, 2);
  setCounters(ring, 2 ** 31 - 2);
  const out = [0, 0];
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 4; i++) assertTrue(ring.push(round, i), `push ${round}.${i}`);
    assertEquals(ring.length, 4);
    assertEquals(ring.push(9, 9), false, "full across the wrap");
    for (let i = 0; i < 4; i++) {
      assertTrue(ring.pop(out));
      assertEquals(out, [round, i]);
    }
    assertEquals(ring.pop(out), false, "empty across the wrap");
  }
  const w = new Int32Array(ring.shared);
  assertEquals(w[TAIL_WORD], -(2 ** 31) + 10, "the tail wrapped");
  assertEquals(w[HEAD_WORD], w[TAIL_WORD]);
});

Deno.test("SpscRing counters wrap past 2^32 (-1 to 0) with records in flight", () => {
  const ring = SpscRing.create(8, 1);
  setCounters(ring, -3);
  const out = [0];
  let next = 0;
  let expected = 0;
  // keep the ring partly full while the counters cross zero
  for (let step = 0; step < 40; step++) {
    while (ring.push(next)) next++;
    assertEquals(ring.length, 8);
    for (let i = 0; i < 5; i++) {
      assertTrue(ring.pop(out));
      assertEquals(out[0], expected++);
    }
    assertEquals(ring.length, 3);
  }
  while (ring.pop(out)) assertEquals(out[0], expected++);
  assertEquals(expected, next);
});

Deno.test("SpscRing views of one buffer are the two ends of the ring (as workers would)", () => {
  const producer = SpscRing.create(2, 2);
  const consumer = new SpscRing(producer.shared);
  assertEquals(consumer.capacity, 2);
  assertTrue(producer.push(1, 2));
  assertEquals(consumer.length, 1);
  const out = [0, 0];
  assertTrue(consumer.pop(out));
  assertEquals(out, [1, 2]);
  assertEquals(producer.length, 0);
});

Deno.test("SpscRing asserts its capacity, record size and buffer", () => {
  assertThrows(() => SpscRing.create(4, 0), AssertionError, "bad record size");
  const shared = new SharedArrayBuffer(spscRingBytes(4, 1));
  const w = new Int32Array(shared);
  w[32] = 3; // capacity word: not a power of two
  w[33] = 1;
  assertThrows(() => new SpscRing(shared), AssertionError, "bad ring capacity");
  w[32] = 8; // more records than the buffer holds
  assertThrows(() => new SpscRing(shared), AssertionError, "ring buffer too small");
  w[32] = 0;
  assertThrows(() => new SpscRing(shared), AssertionError, "bad ring capacity");
});
