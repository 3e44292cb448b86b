import { assertEquals, assertThrows, assertTrue } from "../engine/_assert.ts";
import { AssertionError } from "../assert.ts";
import {
  CTL,
  CTL_F,
  DeviceCtl,
  deviceCtlBytes,
  imageLane,
  LANE,
  MAX_QUEUES,
} from "./device_ctl.ts";

Deno.test("DeviceCtl.create() starts with the gate open, no snapshot and no descriptors", () => {
  const ctl = DeviceCtl.create();
  assertEquals(ctl.admitted, 0);
  assertEquals(ctl.cowActive, false);
  assertEquals(ctl.epoch, 0);
  assertEquals(ctl.error, 0);
  assertEquals(ctl.waiters, 0);
  assertEquals(ctl.poolAddress, 0);
  assertEquals(ctl.w[CTL.STORAGE_FD], -1);
  assertEquals(ctl.w[CTL.STORE_EFD], -1);
  for (let i = 0; i < 2 * MAX_QUEUES; i++) assertEquals(ctl.w[CTL.QUEUE_EFD + i], -1);
  assertEquals(deviceCtlBytes(), CTL.WORDS * 4 + CTL_F.SLOTS * 8);
});

Deno.test("DeviceCtl.admit() admits while the gate is open and counts until finish()", () => {
  const ctl = DeviceCtl.create();
  assertTrue(ctl.admit(0));
  assertTrue(ctl.admit(0));
  assertEquals(ctl.admitted, 2);
  ctl.finish(0);
  ctl.finish(0);
  assertEquals(ctl.admitted, 0);
});

Deno.test("DeviceCtl.admit() refuses while the gate is closed and leaves no count behind", () => {
  const ctl = DeviceCtl.create();
  ctl.closeGate();
  assertEquals(ctl.admit(0), false);
  assertEquals(ctl.admitted, 0);
  ctl.openGate();
  assertTrue(ctl.admit(0));
  assertEquals(ctl.admitted, 1);
  ctl.finish(0);
});

Deno.test("DeviceCtl.finish() asserts more finishes than admissions", () => {
  const ctl = DeviceCtl.create();
  assertThrows(() => ctl.finish(0), AssertionError, "more writes finished than admitted");
});

Deno.test("DeviceCtl.drained() waits for the writes admitted before the gate closed", async () => {
  const ctl = DeviceCtl.create();
  assertTrue(ctl.admit(0));
  ctl.closeGate();
  assertEquals(ctl.admit(0), false, "no new write gets in");
  let done = false;
  const drained = ctl.drained(5000).then((ok) => {
    done = true;
    return ok;
  });
  await new Promise((resolve) => setTimeout(resolve, 20));
  assertEquals(done, false, "one write is still admitted");
  ctl.finish(0);
  assertEquals(await drained, true);
});

Deno.test("DeviceCtl lanes: each queue counts its own writes; drained() waits for every lane", async () => {
  const ctl = DeviceCtl.create();
  assertTrue(ctl.admit(0));
  assertTrue(ctl.admit(3));
  assertTrue(ctl.admit(3));
  assertEquals(ctl.admitted, 3);
  ctl.closeGate();
  assertEquals(ctl.admit(5), false);
  assertEquals(ctl.admitted, 3, "a refused write leaves no count");
  let done = false;
  const drained = ctl.drained(5000).then((ok) => (done = true) && ok);
  ctl.finish(0);
  ctl.finish(3);
  await new Promise((resolve) => setTimeout(resolve, 20));
  assertEquals(done, false, "lane 3 still has a write");
  ctl.finish(3);
  assertEquals(await drained, true);
  assertThrows(() => ctl.finish(3), AssertionError, "more writes finished than admitted");
});

Deno.test("DeviceCtl.drained() is true at once with nothing admitted, false on timeout", async () => {
  const ctl = DeviceCtl.create();
  assertEquals(await ctl.drained(0), true);
  ctl.admit(0);
  ctl.closeGate();
  const start = Date.now();
  assertEquals(await ctl.drained(30), false);
  assertTrue(Date.now() - start >= 25);
  ctl.finish(0);
});

Deno.test("DeviceCtl.corrupt() keeps the first error, stops copy-on-write and bumps events", () => {
  const ctl = DeviceCtl.create();
  Atomics.store(ctl.w, CTL.COW_ACTIVE, 1);
  assertEquals(ctl.cowActive, true);
  assertEquals(ctl.corrupt(-28), true);
  assertEquals(ctl.cowActive, false);
  assertEquals(ctl.error, -28);
  assertEquals(ctl.w[CTL.EVENTS], 1);
  assertEquals(ctl.corrupt(-5), false, "the first error wins");
  assertEquals(ctl.error, -28);
  assertEquals(ctl.w[CTL.EVENTS], 2);
  assertThrows(() => ctl.corrupt(5), AssertionError, "negative errno");
});

Deno.test("DeviceCtl counts parked requests and take counters, and resets them", () => {
  const ctl = DeviceCtl.create();
  ctl.addParked(2);
  ctl.addParked(-1);
  assertEquals(ctl.waiters, 1);
  ctl.count(0, LANE.COW_LOADS);
  ctl.count(1, LANE.COW_LOADS, 2);
  ctl.count(imageLane(0), LANE.IMAGE_READS, 5);
  ctl.count(imageLane(1), LANE.IMAGE_READS);
  ctl.f[CTL_F.FILLED_SECTORS] = 2 ** 40 + 8;
  assertEquals(ctl.counter(LANE.COW_LOADS), 3);
  assertEquals(ctl.counter(LANE.IMAGE_READS), 6);
  assertTrue(ctl.admit(0));
  ctl.count(0, LANE.PARKED);
  assertEquals(ctl.admitted, 1, "counters and the admitted count are separate words");
  ctl.finish(0);
  ctl.resetCounters();
  assertEquals(ctl.counter(LANE.COW_LOADS), 0);
  assertEquals(ctl.counter(LANE.IMAGE_READS), 0);
  assertEquals(ctl.counter(LANE.PARKED), 0);
  assertEquals(ctl.f[CTL_F.FILLED_SECTORS], 0);
  assertEquals(ctl.waiters, 1, "parked requests are not a take's counter");
});

Deno.test("DeviceCtl.queueEventFds() lists the armed eventfds of both kinds of queue", () => {
  const ctl = DeviceCtl.create();
  assertEquals(ctl.queueEventFds(), []);
  ctl.w[CTL.QUEUES] = 3;
  ctl.w[CTL.QUEUE_EFD] = 10;
  ctl.w[CTL.QUEUE_EFD + 2] = 12; // queue 1 has none yet
  ctl.w[CTL.IMAGE_QUEUES] = 1;
  ctl.w[CTL.IMAGE_EFD] = 20;
  ctl.w[CTL.IMAGE_EFD + 1] = 21; // past IMAGE_QUEUES: not listed
  assertEquals(ctl.queueEventFds(), [10, 12, 20]);
});

Deno.test("DeviceCtl views of one buffer share every word (as workers would)", () => {
  const ctl = DeviceCtl.create();
  const other = new DeviceCtl(ctl.shared);
  assertTrue(other.admit(0));
  assertEquals(ctl.admitted, 1);
  ctl.closeGate();
  assertEquals(other.admit(0), false);
  other.finish(0);
  ctl.f[CTL_F.POOL_ADDRESS] = 0x7f00_0000_1000;
  assertEquals(other.poolAddress, 0x7f00_0000_1000);
  assertThrows(
    () => new DeviceCtl(new SharedArrayBuffer(deviceCtlBytes() - 8)),
    AssertionError,
    "too small",
  );
});
