/**
 * A reader of another thread's ChunkTable, for the concurrent test in
 * chunk_test.ts: it looks chunks up through `ChunkTable.fromShared` while
 * the owner claims, transitions, splits segments and doubles the
 * directory, and checks every answer against what the owner has published.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { ChunkState, chunkStateName, ChunkTable } from "./chunk.ts";
import { Rng } from "./_test_util.ts";
import { checkRecord, chunkNumber, R, type ReaderSetup } from "./_chunk_view_shared.ts";

function run(setup: ReaderSetup): void {
  const words = new Int32Array(setup.words);
  const states = new Int32Array(setup.states);
  const views = setup.tables.map((table) => ChunkTable.fromShared(table));
  const rng = new Rng((setup.seed + Math.imul(0x9e3779b9, setup.index + 1)) >>> 0);
  const record = { state: 0, buffer: 0, offset: 0 };
  Atomics.add(words, R.READY, 1);
  for (let lookup = 0; Atomics.load(words, R.STOP) === 0; lookup++) {
    const round = Atomics.load(words, R.ROUND);
    const view = views[round]!;
    const highest = Atomics.load(words, R.PUBLISHED + round);
    if (highest < 0) continue;
    // half the time one of the newest, which the next split is likeliest to move
    const index = rng.chance(0.5)
      ? highest - rng.int(Math.min(highest + 1, 64))
      : rng.int(highest + 1);
    const published = Atomics.load(states, round * setup.claimsPerRound + index);
    let problem: string;
    if (rng.chance(0.1)) {
      // a number never claimed is never found
      const slot = view.find(chunkNumber(index) + 1);
      problem = slot === -1
        ? ""
        : `chunk #${chunkNumber(index) + 1} was never claimed: slot ${slot}`;
    } else if (rng.chance(0.2)) {
      const state = view.state(chunkNumber(index));
      problem = state >= published && state !== ChunkState.NOT_COPIED
        ? ""
        : `state(#${chunkNumber(index)}) is ${chunkStateName(state)}, published ${
          chunkStateName(published)
        }`;
    } else {
      const slot = view.find(chunkNumber(index));
      record.state = view.stateAt(slot);
      record.buffer = view.bufferAt(slot);
      record.offset = view.diffOffsetAt(slot);
      problem = checkRecord(index, published, record);
    }
    if (problem !== "") {
      Atomics.store(words, R.FAIL, 1);
      const replay = `seed=${setup.seed}; replay with BLKSNAP_SEED=${setup.seed}`;
      const at = `reader ${setup.index}, round ${round}, lookup ${lookup}`;
      self.postMessage({ type: "fail", message: `${replay}: ${at}: ${problem}` });
      break;
    }
    Atomics.add(words, R.LOOKUPS + setup.index, 1);
  }
}

self.onmessage = (event: MessageEvent<ReaderSetup>) => {
  try {
    run(event.data);
  } catch (error) {
    Atomics.store(new Int32Array(event.data.words), R.FAIL, 1);
    self.postMessage({
      type: "fail",
      message:
        `seed=${event.data.seed}; replay with BLKSNAP_SEED=${event.data.seed}: reader ${event.data.index} threw ${
          error instanceof Error ? error.stack : String(error)
        }`,
    });
  }
  self.postMessage({ type: "done" });
};
