import { assertEquals, assertThrows, assertTrue } from "../engine/_assert.ts";
import { AssertionError } from "../assert.ts";
import { BufferPool, bufferPoolBytes } from "./buffer_pool.ts";

Deno.test("BufferPool.take() gives every buffer once, then -1 when exhausted", () => {
  const pool = BufferPool.create(70); // three bit words, the last partial
  const taken = new Set<number>();
  for (let i = 0; i < 70; i++) {
    const index = pool.take();
    assertTrue(index >= 0 && index < 70, `buffer ${index}`);
    taken.add(index);
  }
  assertEquals(taken.size, 70);
  assertEquals(pool.take(), -1);
  assertEquals(pool.inUse, 70);
  assertEquals(pool.peak, 70);
});

Deno.test("BufferPool.release() frees a buffer for the next take and counts releases", () => {
  const pool = BufferPool.create(2);
  const a = pool.take();
  const b = pool.take();
  assertEquals(pool.take(), -1);
  pool.release(a);
  assertEquals(pool.inUse, 1);
  assertEquals(pool.releases, 1);
  assertEquals(pool.take(), a);
  pool.release(b);
  pool.release(a);
  assertEquals(pool.releases, 3);
  assertEquals(pool.inUse, 0);
  assertEquals(pool.peak, 2, "the peak stays");
});

Deno.test("BufferPool.release() asserts a buffer released twice, or out of range", () => {
  const pool = BufferPool.create(40);
  assertThrows(() => pool.release(3), AssertionError, "buffer 3 released twice");
  const index = pool.take();
  pool.release(index);
  assertThrows(() => pool.release(index), AssertionError, "released twice");
  assertEquals(pool.inUse, 0, "a double release does not count");
  assertEquals(pool.releases, 1);
  assertThrows(() => pool.release(-1), AssertionError, "release of buffer -1");
  assertThrows(() => pool.release(40), AssertionError, "release of buffer 40");
  assertThrows(() => pool.release(Number.NaN), AssertionError, "release of buffer NaN");
});

Deno.test("BufferPool.peak is the most in use at once", () => {
  const pool = BufferPool.create(8);
  const a = pool.take();
  const b = pool.take();
  const c = pool.take();
  pool.release(b);
  pool.release(a);
  pool.take();
  assertEquals(pool.inUse, 2);
  assertEquals(pool.peak, 3);
  pool.release(c);
});

Deno.test("BufferPool.reset() frees every buffer and forgets the peak", () => {
  const pool = BufferPool.create(33);
  while (pool.take() >= 0) { /* exhaust it */ }
  pool.reset();
  assertEquals(pool.inUse, 0);
  assertEquals(pool.peak, 0);
  let count = 0;
  while (pool.take() >= 0) count++;
  assertEquals(count, 33);
});

Deno.test("BufferPool views of one buffer share the free bits (as workers would)", () => {
  const pool = BufferPool.create(32); // a full bit word: bit 31 is the sign bit
  const other = new BufferPool(pool.shared);
  assertEquals(other.count, 32);
  const seen = new Set<number>();
  for (let i = 0; i < 16; i++) {
    seen.add(pool.take());
    seen.add(other.take());
  }
  assertEquals(seen.size, 32, "no buffer was given to both");
  assertTrue(seen.has(31));
  assertEquals(pool.take(), -1);
  assertEquals(other.take(), -1);
  other.release(31);
  assertEquals(pool.take(), 31);
});

Deno.test("BufferPool asserts its size and control block", () => {
  assertThrows(() => BufferPool.create(0), AssertionError, "bad pool size");
  assertThrows(() => BufferPool.create(1 << 27), AssertionError, "bad pool size");
  const shared = new SharedArrayBuffer(bufferPoolBytes(64) - 4);
  new Int32Array(shared)[0] = 64;
  assertThrows(() => new BufferPool(shared), AssertionError, "too small");
  assertEquals(bufferPoolBytes(64), (4 + 2) * 4);
});
