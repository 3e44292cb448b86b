import { deepStrictEqual as assertEquals, throws } from "node:assert/strict";
import { decodeOwnerTag, encodeOwnerTag } from "./owner_tag.ts";

Deno.test("encodeOwnerTag() round-trips every role and the edges of dev_t", () => {
  for (const role of ["tracked", "image"] as const) {
    for (const key of ["0:0", "7:0", "259:3", "4095:1048575", "8:1048575", "4095:0"]) {
      const tag = { role, originalDevice: key };
      assertEquals(decodeOwnerTag(encodeOwnerTag(tag)), tag);
    }
  }
});

Deno.test("encodeOwnerTag() refuses numbers the kernel's dev_t cannot hold", () => {
  throws(() => encodeOwnerTag({ role: "tracked", originalDevice: "4096:0" }), /out of range/);
  throws(() => encodeOwnerTag({ role: "tracked", originalDevice: "1:1048576" }), /out of range/);
});

Deno.test("decodeOwnerTag() is null for flags other programs (or none) set", () => {
  assertEquals(decodeOwnerTag(0n), null);
  assertEquals(decodeOwnerTag(0xffff_ffff_ffff_ffffn), null);
  const tracked = encodeOwnerTag({ role: "tracked", originalDevice: "7:0" });
  assertEquals(decodeOwnerTag(tracked | (3n << 32n)), null); // no such role
  assertEquals(decodeOwnerTag(tracked | (1n << 40n)), null); // reserved bits set
});
