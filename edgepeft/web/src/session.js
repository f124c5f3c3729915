// WebSession: train, evaluate and predict with a bundle on ONNX Runtime Web's training build.
// What web cannot keep: ORT Web saves no checkpoint, so the AdamW moments and step count live only as long as the
// session; a resumed run (trainable values saved with trainableValues/adapter, loaded with setTrainable) starts
// fresh moments. See edgepeft/web/README.md.
import { BundleError } from "./bundle.js";
import { TextEncoder as BundleTextEncoder } from "./tokenizer.js";
import { withSchedule } from "./lr.js";
import { adapterFiles } from "./adapter.js";

export class CancelledError extends Error {
  constructor() { super("training was cancelled"); this.name = "CancelledError"; }
}

/** A seeded PRNG (mulberry32) for the epoch order: a function of (seed, epoch) only. */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function epochOrder(n, seed, epoch, shuffle = true) {
  const order = Array.from({ length: n }, (_, i) => i);
  if (!shuffle) return order;
  const next = rng((seed * 1000003 + epoch * 7919 + 1) >>> 0);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

const DEFAULTS = { epochs: 1, batchSize: 8, learningRate: 1e-3, schedule: "constant", warmupSteps: 0, shuffle: true, seed: 0, maxSteps: null };

export class WebSession {
  /** Use `await WebSession.create(ort, bundle, {threads})`. */
  constructor(ort, bundle, options) {
    this.ort = ort;
    this.bundle = bundle;
    this.manifest = bundle.manifest;
    this.options = options;
    this.encoder = bundle.files["tokenizer.json"] ? new BundleTextEncoder(bundle) : null;
    this.session = null;
    this.schedule = null; // the optimizer table the current ORT session was made with
    this.stepsTaken = 0; // optimizer steps taken with this session's current optimizer state
    if (this.manifest.loss !== "cross_entropy" && this.manifest.loss !== "mse" && this.manifest.loss !== "bce") {
      throw new BundleError(`bundle loss ${this.manifest.loss}: the web runtime trains cross_entropy, mse and bce bundles`);
    }
  }

  static async create(ort, bundle, options = {}) {
    const s = new WebSession(ort, bundle, options);
    await s._open(options.schedule || null);
    return s;
  }

  /** (Re)build the ORT session; `schedule` null keeps the optimizer graph as exported (fixed rate 1e-3). */
  async _open(schedule, values = null) {
    const { files } = this.bundle;
    const optimizer = schedule ? withSchedule(files["optimizer_model.onnx"], schedule) : files["optimizer_model.onnx"];
    if (this.session) await this.session.release();
    const started = performance.now();
    try {
      this.session = await this.ort.TrainingSession.create({
        checkpointState: files.checkpoint,
        trainModel: files["training_model.onnx"],
        evalModel: files["eval_model.onnx"],
        optimizerModel: optimizer,
      }, this.options.sessionOptions || {});
    } catch (e) {
      throw new BundleError(`ONNX Runtime Web cannot load the bundle: ${String(e.message || e).split("\n")[0]}`);
    }
    this.openMs = performance.now() - started;
    this.schedule = schedule;
    this.stepsTaken = 0;
    const expected = this.manifest.trainable.reduce((n, s) => n + s.shape.reduce((a, b) => a * b, 1), 0);
    const size = await this.session.getParametersSize(true);
    if (size !== expected) throw new BundleError(`the checkpoint holds ${size} trainable values, the manifest ${expected}`);
    if (values) await this.setTrainable(values);
  }

  // ---- data ---------------------------------------------------------------------------------

  /** Texts (and label names, indices or numbers) -> a dataset of unpadded encodings. */
  dataset(texts, labels = null) {
    if (!this.encoder) throw new BundleError("this bundle takes arrays, not text");
    const rows = this.encoder.encode(texts);
    return { rows, labels: labels == null ? null : this.encodeLabels(labels) };
  }

  encodeLabels(labels) {
    const names = this.manifest.labels || [];
    return labels.map((v, i) => {
      if (this.manifest.loss === "cross_entropy") {
        if (names.length) {
          const k = names.indexOf(String(v));
          if (k < 0) throw new BundleError(`label ${JSON.stringify(v)} (row ${i + 1}) is not one of the bundle's labels ${names.join(", ")}`);
          return k;
        }
        const k = Number(v);
        if (!Number.isInteger(k) || k < 0) throw new BundleError(`label ${JSON.stringify(v)} (row ${i + 1}) is not a class index`);
        return k;
      }
      const x = Number(v);
      if (!Number.isFinite(x)) throw new BundleError(`label ${JSON.stringify(v)} (row ${i + 1}) is not a number`);
      return x;
    });
  }

  _feeds(data, index, withLabels) {
    const { ort } = this;
    const batch = this.encoder.padBatch(index.map((i) => data.rows[i]));
    const feeds = {};
    for (const [name, { data: values, dims }] of Object.entries(batch)) feeds[name] = new ort.Tensor("int64", values, dims);
    const label = this.manifest.label;
    const labels = index.map((i) => (withLabels && data.labels ? data.labels[i] : 0));
    if (label.dtype === "int64") feeds[label.name] = new ort.Tensor("int64", BigInt64Array.from(labels.map(BigInt)), [index.length]);
    else {
      const width = label.shape.length > 1 ? label.shape[1] : null;
      if (width != null) throw new BundleError("multi-output labels are not supported by the web runtime yet");
      feeds[label.name] = new ort.Tensor("float32", Float32Array.from(labels), [index.length]);
    }
    return feeds;
  }

  // ---- training -----------------------------------------------------------------------------

  totalSteps(examples, config) {
    const total = Math.ceil(examples / config.batchSize) * config.epochs;
    return config.maxSteps ? Math.min(total, config.maxSteps) : total;
  }

  /**
   * Train on `data`: {epochs, batchSize, learningRate, schedule, warmupSteps, shuffle, seed, maxSteps, stepOffset}.
   * `onStep({step, total, loss, epoch, ms})` after each optimizer step; `signal` (an AbortSignal) cancels between
   * steps. Returns {steps, losses, stepMs, epochLosses, stopped}. A new schedule rebuilds the ORT session (its
   * trainable values carried over; its AdamW moments dropped, as a resumed run's are).
   */
  async train(data, config = {}, { onStep = null, signal = null } = {}) {
    config = { ...DEFAULTS, ...config };
    if (!data.labels || !data.rows.length) throw new BundleError("training data is empty or has no labels");
    const total = this.totalSteps(data.rows.length, config);
    const schedule = { learningRate: config.learningRate, schedule: config.schedule, warmupSteps: config.warmupSteps,
                       totalSteps: total, stepOffset: config.stepOffset || 0 };
    if (JSON.stringify(schedule) !== JSON.stringify(this.schedule) || this.stepsTaken > 0) {
      await this._open(schedule, await this.trainableValues());
    }
    const losses = [], stepMs = [], epochLosses = [];
    let stopped = "complete", step = 0;
    for (let epoch = 0; epoch < config.epochs && stopped === "complete"; epoch++) {
      const order = epochOrder(data.rows.length, config.seed, epoch, config.shuffle);
      let sum = 0, seen = 0;
      for (let start = 0; start < order.length; start += config.batchSize) {
        if (config.maxSteps && step >= config.maxSteps) { stopped = "max_steps"; break; }
        if (signal && signal.aborted) { stopped = "cancelled"; break; }
        const index = order.slice(start, start + config.batchSize);
        const t0 = performance.now();
        const out = await this.session.runTrainStep(this._feeds(data, index, true));
        const loss = Number(out.loss.data[0]);
        if (!Number.isFinite(loss)) { await this.session.lazyResetGrad(); stopped = "non_finite"; break; }
        await this.session.runOptimizerStep();
        await this.session.lazyResetGrad();
        this.stepsTaken++;
        step++;
        const ms = performance.now() - t0;
        losses.push(loss); stepMs.push(ms);
        sum += loss * index.length; seen += index.length;
        if (onStep) await onStep({ step, total, loss, epoch, ms });
      }
      if (seen === data.rows.length) epochLosses.push(sum / seen);
    }
    return { steps: step, total, losses, stepMs, epochLosses, stopped };
  }

  // ---- evaluation and prediction ------------------------------------------------------------

  async _outputs(data, batchSize, withLabels) {
    const loss = [], logits = [];
    for (let start = 0; start < data.rows.length; start += batchSize) {
      const index = Array.from({ length: Math.min(batchSize, data.rows.length - start) }, (_, i) => start + i);
      const out = await this.session.runEvalStep(this._feeds(data, index, withLabels));
      loss.push([Number(out.loss.data[0]), index.length]);
      const output = out[this.manifest.outputs[0].name];
      const width = output.dims[output.dims.length - 1] || 1;
      for (let r = 0; r < index.length; r++) logits.push(Array.from(output.data.subarray(r * width, (r + 1) * width)));
    }
    return { loss, logits };
  }

  /** Mean loss, and accuracy for a classifier. */
  async evaluate(data, batchSize = 8) {
    if (!data.labels || !data.rows.length) throw new BundleError("evaluation data is empty or has no labels");
    const { loss, logits } = await this._outputs(data, batchSize, true);
    const meanLoss = loss.reduce((s, [l, n]) => s + l * n, 0) / data.rows.length;
    let accuracy = null;
    if (this.manifest.loss === "cross_entropy") {
      accuracy = logits.filter((row, i) => argmax(row) === data.labels[i]).length / data.rows.length;
    }
    return { loss: meanLoss, accuracy, examples: data.rows.length };
  }

  /** Outputs per text; for a classifier also probabilities, class index and label name. */
  async predict(texts, batchSize = 8) {
    const data = Array.isArray(texts) && typeof texts[0] === "string" ? this.dataset(texts) : texts;
    const { logits } = await this._outputs(data, batchSize, false);
    if (this.manifest.loss !== "cross_entropy") return logits.map((outputs) => ({ outputs }));
    return logits.map((outputs) => {
      const m = Math.max(...outputs);
      const e = outputs.map((x) => Math.exp(x - m));
      const z = e.reduce((a, b) => a + b, 0);
      const k = argmax(outputs);
      return { outputs, probabilities: e.map((x) => x / z), class: k, label: this.manifest.labels?.[k] ?? null };
    });
  }

  // ---- trainable values and adapters --------------------------------------------------------

  /** Current trainable values by ONNX name (the manifest's order is the checkpoint's contiguous order). */
  async trainableValues() {
    const flat = (await this.session.getContiguousParameters(true)).data;
    const values = {};
    let at = 0;
    for (const spec of this.manifest.trainable) {
      const n = spec.shape.reduce((a, b) => a * b, 1);
      values[spec.name] = Float32Array.from(flat.subarray(at, at + n));
      at += n;
    }
    return values;
  }

  /** Replace the trainable values (resume from saved values, or load an adapter). */
  async setTrainable(values) {
    const parts = this.manifest.trainable.map((spec) => {
      const v = values[spec.name];
      const n = spec.shape.reduce((a, b) => a * b, 1);
      if (!v || v.length !== n) throw new BundleError(`trainable value ${spec.name} must hold ${n} floats`);
      return v;
    });
    const flat = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { flat.set(p, at); at += p.length; }
    await this.session.loadParametersBuffer(new Uint8Array(flat.buffer), true);
  }

  /** The adapter files (adapter_config.json, adapter_model.safetensors) of the current values, as bytes. */
  async adapterFiles() { return adapterFiles(this.bundle, await this.trainableValues()); }

  async release() { if (this.session) await this.session.release(); this.session = null; }
}

export function argmax(row) {
  let k = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[k]) k = i;
  return k;
}
