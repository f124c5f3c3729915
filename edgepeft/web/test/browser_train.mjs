#!/usr/bin/env node
// Drive the demo page in headless Chromium (Debian's /usr/bin/chromium through playwright-core): choose a local
// data file, train, download the adapter; log every request the page (and its workers) made.
//   node test/browser_train.mjs --url http://127.0.0.1:PORT/ --data train.csv [--eval-data test.csv]
//        --out DIR [--max-steps 8] [--lr 0.002] [--batch-size 8] [--epochs 1] [--timeout 600]
// Prints a JSON report: {requests, foreign, crossOriginIsolated, result, downloads}.
import { chromium } from "playwright-core";
import path from "node:path";
import { mkdir, readdir, readFile } from "node:fs/promises";

/** Peak RSS (VmHWM, MB) of each process under `root` (Linux /proc): the renderer's is the page's. */
async function peakRss(root) {
  const procs = [];
  for (const name of await readdir("/proc").catch(() => [])) {
    if (!/^\d+$/.test(name)) continue;
    const status = await readFile(`/proc/${name}/status`, "utf8").catch(() => "");
    const ppid = Number(/PPid:\s+(\d+)/.exec(status)?.[1]);
    const hwm = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] || 0) / 1024;
    const cmd = await readFile(`/proc/${name}/cmdline`, "utf8").catch(() => "");
    procs.push({ pid: Number(name), ppid, hwm, renderer: cmd.includes("--type=renderer") });
  }
  const tree = new Set([root]);
  for (let grew = true; grew;) {
    grew = false;
    for (const p of procs) if (!tree.has(p.pid) && tree.has(p.ppid)) { tree.add(p.pid); grew = true; }
  }
  const mine = procs.filter((p) => tree.has(p.pid));
  return { rendererMb: Math.max(0, ...mine.filter((p) => p.renderer).map((p) => p.hwm)),
           browserTotalMb: mine.reduce((n, p) => n + p.hwm, 0) };
}

const argv = process.argv.slice(2);
const get = (k, d) => { const i = argv.indexOf(k); return i >= 0 ? argv[i + 1] : d; };
const url = get("--url"), out = get("--out");
const timeout = Number(get("--timeout", "600")) * 1000;
await mkdir(out, { recursive: true });
const args = ["--headless=new"];
if (process.getuid && process.getuid() === 0) args.push("--no-sandbox");
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args });
const report = { requests: [], console: [] };
try {
  const context = await browser.newContext({ acceptDownloads: true });
  context.on("request", (r) => report.requests.push(r.url()));
  const page = await context.newPage();
  page.on("console", (m) => report.console.push(m.text()));
  page.on("pageerror", (e) => report.console.push("pageerror: " + e.message));
  const t0 = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.edgepeft && (window.edgepeft.session || window.edgepeft.error), null, { timeout });
  report.readyMs = Date.now() - t0;
  const error = await page.evaluate(() => window.edgepeft.error || null);
  if (error) throw new Error(`the page failed: ${error}`);
  report.crossOriginIsolated = await page.evaluate(() => self.crossOriginIsolated);
  report.threads = await page.evaluate(() => navigator.hardwareConcurrency);
  await page.setInputFiles("#data", get("--data"));
  if (get("--eval-data")) await page.setInputFiles("#eval-data", get("--eval-data"));
  for (const [id, flag] of [["max-steps", "--max-steps"], ["lr", "--lr"], ["batch-size", "--batch-size"], ["epochs", "--epochs"]]) {
    if (get(flag)) await page.fill("#" + id, get(flag));
  }
  await page.click("#train");
  await page.waitForFunction(() => window.edgepeft.result.done || window.edgepeft.error, null, { timeout, polling: 500 });
  const trainError = await page.evaluate(() => window.edgepeft.error || null);
  if (trainError) throw new Error(`training failed in the page: ${trainError}`);
  report.result = await page.evaluate(() => window.edgepeft.result);
  report.progress = await page.evaluate(() => [document.getElementById("progress").value, document.getElementById("progress").max]);
  await page.fill("#text", "Mr. Darcy and Elizabeth walked to Pemberley.");
  await page.click("#predict");
  await page.waitForFunction(() => document.getElementById("prediction").textContent.length > 0);
  report.tryPrediction = await page.textContent("#prediction");
  const downloads = [];
  const done = new Promise((resolve) => {
    page.on("download", async (d) => {
      const file = path.join(out, d.suggestedFilename());
      await d.saveAs(file);
      downloads.push(file);
      if (downloads.length === 2) resolve();
    });
  });
  await page.click("#download");
  await done;
  report.downloads = downloads;
  const origin = new URL(url).origin;
  report.memory = await peakRss(process.pid); // the browser runs as this process's child
  report.foreign = report.requests.filter((r) => !(r.startsWith(origin + "/") || r.startsWith("blob:" + origin + "/")));
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
