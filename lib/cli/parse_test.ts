import { deepStrictEqual as assertEquals, throws as assertThrows } from "node:assert/strict";
import { parseRanges, parseSize, parseTimeout, requireUuid, stringList } from "./parse.ts";
import { type Command, parseCommandLine, UsageError } from "./command.ts";

Deno.test("parseSize() takes bytes and K/M/G/T suffixes in powers of 1024", () => {
  const cases: Array<[string, number]> = [
    ["0", 0],
    ["512", 512],
    ["1K", 1024],
    ["4k", 4096],
    ["10M", 10 * 1024 ** 2],
    ["2G", 2 * 1024 ** 3],
    ["3g", 3 * 1024 ** 3],
    ["1T", 1024 ** 4],
    ["007M", 7 * 1024 ** 2],
  ];
  for (const [text, bytes] of cases) assertEquals(parseSize(text, "limit"), bytes, text);
});

Deno.test("parseSize() refuses garbage, negatives, fractions and overflow", () => {
  for (
    const text of ["", "-1", "-1G", "1.5G", "0.5", "G", "1GB", "1 G", "1P", "1e9", "0x10", "ten"]
  ) {
    assertThrows(() => parseSize(text, "limit"), UsageError, text);
  }
  assertThrows(() => parseSize("9999999999T", "limit"), /too large/);
  assertThrows(() => parseSize("1.5G", "limit"), /--limit must be a whole number.*"1.5G"/);
});

Deno.test("parseRanges() takes sector:count, several per value by space or comma", () => {
  assertEquals(parseRanges(["0:8"], "range"), [{ sector: 0, count: 8 }]);
  assertEquals(parseRanges(["0:8,16:1", "100:2  200:3", " 5:5 , 6:6 "], "range"), [
    { sector: 0, count: 8 },
    { sector: 16, count: 1 },
    { sector: 100, count: 2 },
    { sector: 200, count: 3 },
    { sector: 5, count: 5 },
    { sector: 6, count: 6 },
  ]);
  assertEquals(parseRanges([""], "range"), []);
});

Deno.test("parseRanges() refuses bad ranges with the offending word", () => {
  for (const word of ["0", "0:", ":8", "0:0", "-1:8", "0:-8", "1.5:8", "a:b", "0:8:1", "0-8"]) {
    assertThrows(() => parseRanges([word], "range"), new RegExp(`not "${word}"`), word);
  }
  assertThrows(() => parseRanges(["99999999999999999999:1"], "range"), UsageError);
});

const cmd = { name: "snapshot_take" } as Command;

Deno.test("requireUuid() accepts a UUID in either case and returns it in lower case", () => {
  const id = "0123ABCD-4567-89ef-0123-456789ABCDEF";
  assertEquals(requireUuid({ id }, "id", cmd), id.toLowerCase());
  for (const bad of ["", "x", id.replaceAll("-", ""), `{${id}}`, id.slice(1), id + "0"]) {
    assertThrows(() => requireUuid({ id: bad }, "id", cmd), UsageError, bad);
  }
  assertThrows(() => requireUuid({}, "id", cmd), /snapshot_take: --id is required/);
});

Deno.test("parseTimeout() takes 0..2^31-1 milliseconds", () => {
  assertEquals(parseTimeout("0", "timeout"), 0);
  assertEquals(parseTimeout("1000", "timeout"), 1000);
  assertEquals(parseTimeout("2147483647", "timeout"), 2147483647);
  for (const bad of ["", "-1", "1.5", "2147483648", "1s", "ten"]) {
    assertThrows(() => parseTimeout(bad, "timeout"), UsageError, bad);
  }
});

Deno.test("parseCommandLine(): multitoken options take the following words", () => {
  const multi = {
    name: "m",
    options: {
      device: { type: "string", short: "d", multiple: true },
      file: { type: "string", short: "f" },
    },
    multitoken: ["device"],
  } as unknown as Command;
  const p = (...argv: string[]) => parseCommandLine(multi, argv);
  assertEquals(stringList(p("-d", "/a", "/b", "-f", "/s", "-d", "/c").values, "device"), [
    "/a",
    "/b",
    "/c",
  ]);
  assertEquals(stringList(p("--device=/a", "/b", "--json").values, "device"), ["/a", "/b"]);
  const after = p("-f", "/s", "x", "-d", "/a", "--", "y");
  assertEquals([stringList(after.values, "device"), after.positionals], [["/a"], ["x", "y"]]);
});
