#!/usr/bin/env node
// Print the token ids the web runtime gives each text of a data file (JSON lines), to compare with Python's.
//   node bin/edgepeft-web-tokenize.mjs --bundle DIR --data FILE [--text-column text]
import { readFile } from "node:fs/promises";
import { openBundleDir } from "../src/node.js";
import { TextEncoder, parseTable } from "../src/edgepeft.js";

const argv = process.argv.slice(2);
const get = (k, d) => { const i = argv.indexOf(k); return i >= 0 ? argv[i + 1] : d; };
const bundle = await openBundleDir(get("--bundle"));
const { texts } = parseTable(await readFile(get("--data"), "utf8"), get("--data"), { textColumn: get("--text-column", "text") });
const encoder = new TextEncoder(bundle);
const lines = encoder.encode(texts).map((e) => JSON.stringify([e.ids, e.typeIds]));
process.stdout.write(lines.join("\n") + "\n");
