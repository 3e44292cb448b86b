import { strictEqual as assertEquals } from "node:assert/strict";
import { packUserData, UD_KIND, udKind, udSub, udTag } from "./user_data.ts";

Deno.test("user_data packs tag, kind and sub-index into 32 bits and back", () => {
  for (
    const [kind, tag, sub] of [[UD_KIND.UBLK_CMD, 0, 0], [UD_KIND.TARGET_IO, 4095, 255], [
      5,
      65535,
      1,
    ]]
  ) {
    const ud = packUserData(kind!, tag!, sub!);
    assertEquals(ud >= 0 && ud <= 0xffff_ffff, true);
    assertEquals(udKind(ud), kind);
    assertEquals(udTag(ud), tag);
    assertEquals(udSub(ud), sub);
  }
});
