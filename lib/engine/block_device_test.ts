import { assertEquals } from "./_assert.ts";
import { unitOf } from "./block_device.ts";

Deno.test("unitOf() is floor(sector / 2^shift) below and past 2^31 sectors", () => {
  for (const shift of [0, 3, 7, 9, 21]) {
    for (
      const sector of [0, 1, 2 ** shift - 1, 2 ** shift, 12345, 0x7fff_ffff, 2 ** 31, 2 ** 40 + 7]
    ) {
      assertEquals(unitOf(sector, shift), Math.floor(sector / 2 ** shift), `${sector} >> ${shift}`);
    }
  }
});
