#!/usr/bin/env node
// Train a bundle under Node with the web runtime: a board without a browser (and the tests) use it.
//   node bin/edgepeft-web-train.mjs --bundle DIR --data train.csv [--eval-data test.csv] [--adapter-out DIR]
//        [--epochs 1] [--batch-size 8] [--lr 1e-3] [--schedule constant] [--warmup 0] [--max-steps N] [--seed 0]
//        [--threads 1] [--no-shuffle] [--report out.json] [--predict-out preds.json] [--values-out v.bin]
//        [--values-in v.bin] [--step-offset 0]
// Prints a JSON report on stdout.
import { readFile, writeFile, mkdir } from "node:fs/promises";
import path from "node:path";
import { loadOrt, openBundleDir } from "../src/node.js";
import { WebSession, parseTable } from "../src/edgepeft.js";

function args(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--")) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2);
    if (key === "no-shuffle") out.shuffle = false;
    else out[key] = argv[++i];
  }
  return out;
}

async function table(file, session) {
  const { texts, labels } = parseTable(await readFile(file, "utf8"), file);
  return session.dataset(texts, labels);
}

const a = args(process.argv.slice(2));
if (!a.bundle || !a.data) { console.error("usage: edgepeft-web-train.mjs --bundle DIR --data FILE ..."); process.exit(2); }
const peakRss = () => process.memoryUsage().rss / 1e6;
let peak = peakRss();
const t0 = performance.now();
const ort = loadOrt({ threads: Number(a.threads || 1) });
const bundle = await openBundleDir(a.bundle);
const session = await WebSession.create(ort, bundle);
const opened = performance.now() - t0;
if (a["values-in"]) {
  const buf = await readFile(a["values-in"]);
  const flat = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
  const values = {};
  let at = 0;
  for (const s of bundle.manifest.trainable) { const n = s.shape.reduce((x, y) => x * y, 1); values[s.name] = flat.slice(at, at + n); at += n; }
  await session.setTrainable(values);
}
const train = await table(a.data, session);
const evalData = a["eval-data"] ? await table(a["eval-data"], session) : null;
const before = evalData ? await session.evaluate(evalData) : null;
const config = {
  epochs: Number(a.epochs || 1), batchSize: Number(a["batch-size"] || 8), learningRate: Number(a.lr || 1e-3),
  schedule: a.schedule || "constant", warmupSteps: Number(a.warmup || 0), seed: Number(a.seed || 0),
  shuffle: a.shuffle !== false, maxSteps: a["max-steps"] ? Number(a["max-steps"]) : null, stepOffset: Number(a["step-offset"] || 0),
};
let firstStepAt = null;
const result = await session.train(train, config, {
  onStep: ({ step }) => { peak = Math.max(peak, peakRss()); if (step === 1) firstStepAt = performance.now() - t0; },
});
const after = evalData ? await session.evaluate(evalData) : null;
const report = { steps: result.steps, losses: result.losses, stepMs: result.stepMs, stopped: result.stopped,
                 accuracyBefore: before?.accuracy ?? null, accuracyAfter: after?.accuracy ?? null,
                 lossBefore: before?.loss ?? null, lossAfter: after?.loss ?? null,
                 openMs: opened, coldStartMs: firstStepAt, peakRssMb: Math.max(peak, peakRss()) };
if (a["adapter-out"]) {
  await mkdir(a["adapter-out"], { recursive: true });
  for (const [name, bytes] of Object.entries(await session.adapterFiles())) await writeFile(path.join(a["adapter-out"], name), bytes);
}
if (a["values-out"]) {
  const values = await session.trainableValues();
  const parts = bundle.manifest.trainable.map((s) => values[s.name]);
  const flat = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0; for (const p of parts) { flat.set(p, at); at += p.length; }
  await writeFile(a["values-out"], new Uint8Array(flat.buffer));
}
if (a["predict-out"] && evalData) {
  const preds = await session.predict(evalData);
  await writeFile(a["predict-out"], JSON.stringify(preds.map((p) => p.class ?? p.outputs)));
}
const text = JSON.stringify(report);
if (a.report) await writeFile(a.report, text);
console.log(text);
await session.release();
