/**
 * blksnap: block-device snapshots with change-block tracking, in userspace,
 * over the Linux ublk driver. See README.md.
 */
import { main } from "./lib/cli/main.ts";

if (import.meta.main) {
  try {
    Deno.exitCode = await main(Deno.args);
  } catch (err) {
    console.error(`blksnap: internal error: ${err instanceof Error ? err.stack : String(err)}`);
    Deno.exitCode = 70;
  }
}
