// The demo page: open the served bundle, read the user's file locally, train, evaluate, predict, download.
import * as ort from "/ort/ort.training.wasm.min.mjs";
import { openBundle, urlReader, WebSession, parseTable, epochOrder } from "/src/edgepeft.js";

const $ = (id) => document.getElementById(id);
const state = { session: null, result: {}, controller: null };
window.edgepeft = state; // for tests and the curious: figures of the last run

ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

function status(text) { $("status").textContent = text; }

async function readFile(input) {
  const file = input.files[0];
  if (!file) return null;
  return parseTable(await file.text(), file.name); // File API: the bytes stay in this page
}

function drawLosses(losses) {
  const canvas = $("loss-curve"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (losses.length < 2) return;
  const max = Math.max(...losses), min = Math.min(...losses), span = max - min || 1;
  g.beginPath();
  losses.forEach((l, i) => {
    const x = (i / (losses.length - 1)) * (canvas.width - 10) + 5;
    const y = canvas.height - 5 - ((l - min) / span) * (canvas.height - 10);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

async function train() {
  const s = state.session;
  const data = await readFile($("data"));
  if (!data) { status("choose a data file first"); return; }
  if (!data.labels) { status("the data file has no `label` column"); return; }
  let trainSet, heldOut;
  const evalFile = await readFile($("eval-data"));
  if (evalFile) {
    trainSet = s.dataset(data.texts, data.labels);
    heldOut = s.dataset(evalFile.texts, evalFile.labels);
  } else {
    const order = epochOrder(data.texts.length, 12345, 0, true);
    const cut = Math.round(data.texts.length * (1 - Number($("holdout").value)));
    const pick = (idx) => [idx.map((i) => data.texts[i]), idx.map((i) => data.labels[i])];
    trainSet = s.dataset(...pick(order.slice(0, cut)));
    heldOut = s.dataset(...pick(order.slice(cut)));
  }
  const config = { epochs: Number($("epochs").value), batchSize: Number($("batch-size").value), learningRate: Number($("lr").value),
                   schedule: $("schedule").value, maxSteps: Number($("max-steps").value) || null };
  const clicked = performance.now();
  state.controller = new AbortController();
  $("cancel").disabled = false; $("train").disabled = true;
  status("evaluating before training ...");
  const before = await s.evaluate(heldOut);
  $("acc-before").textContent = before.accuracy == null ? before.loss.toFixed(4) : (100 * before.accuracy).toFixed(1) + "%";
  const losses = [];
  const started = performance.now();
  state.result.beforeEvalMs = started - clicked;
  const run = await s.train(trainSet, config, {
    signal: state.controller.signal,
    onStep: async ({ step, total, loss, ms }) => {
      losses.push(loss);
      $("progress").max = total; $("progress").value = step;
      $("step-text").textContent = `step ${step}/${total}, loss ${loss.toFixed(4)}, ${ms.toFixed(0)} ms`;
      if (step % 5 === 0 || step === total) drawLosses(losses);
      // cold start: page load to a ready session (openMs), then train start (the session rebuilt with the
      // schedule) to the end of the first step
      if (step === 1) state.result.firstStepMs = performance.now() - started;
      await new Promise((r) => setTimeout(r, 0)); // let the page paint
    },
  });
  drawLosses(losses);
  status(`trained ${run.steps} steps (${run.stopped}) in ${((performance.now() - started) / 1000).toFixed(1)} s; evaluating ...`);
  const after = await s.evaluate(heldOut);
  $("acc-after").textContent = after.accuracy == null ? after.loss.toFixed(4) : (100 * after.accuracy).toFixed(1) + "%";
  const predictions = await s.predict(heldOut);
  Object.assign(state.result, { before, after, losses, stepMs: run.stepMs, steps: run.steps, stopped: run.stopped,
                                heldOutPredictions: predictions.map((p) => p.class ?? p.outputs[0]), done: true });
  status(`done: ${run.steps} steps, held-out accuracy ${$("acc-before").textContent} -> ${$("acc-after").textContent}`);
  $("cancel").disabled = true; $("train").disabled = false; $("download").disabled = false; $("try").disabled = false;
}

async function download() {
  const files = await state.session.adapterFiles();
  for (const [name, bytes] of Object.entries(files)) {
    const url = URL.createObjectURL(new Blob([bytes]));
    const a = document.createElement("a");
    a.href = url; a.download = name; document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
}

async function main() {
  state.pageStart = performance.now();
  try {
    const bundle = await openBundle(urlReader("/bundle/"), { onFile: (name) => status(`verified ${name} ...`) });
    $("bundle-name").textContent = bundle.manifest.base_names?.[0] || "the bundle";
    status("opening the training session ...");
    state.session = await WebSession.create(ort, bundle);
    state.result.openMs = performance.now() - state.pageStart;
    status(`ready (${ort.env.wasm.numThreads} thread(s)): choose a data file and train`);
    $("controls").disabled = false; $("try").disabled = false;
  } catch (e) {
    status(`error: ${e.message}`); state.error = e.message; return;
  }
  $("train").onclick = () => train().catch((e) => { status(`error: ${e.message}`); state.error = e.message; $("train").disabled = false; });
  $("cancel").onclick = () => state.controller?.abort();
  $("download").onclick = () => download();
  $("predict").onclick = async () => {
    const [p] = await state.session.predict([$("text").value || " "]);
    $("prediction").textContent = p.label ?? p.class ?? p.outputs.join(", ");
  };
}
main();
