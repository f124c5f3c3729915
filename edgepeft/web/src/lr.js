// The learning-rate schedule baked into the optimizer graph (see edgepeft/export/web_lr.py): ONNX Runtime Web has
// no learning-rate setter, so the table of eight float32s after a 16-byte marker is rewritten in the optimizer
// model's bytes before the session opens. The length does not change, so the protobuf stays valid.
import { BundleError } from "./bundle.js";

export const MAGIC = new TextEncoder().encode("edgepeft-lr-v1::");
export const SCHEDULES = { constant: 0, linear: 1, cosine: 2 };

function findOnce(bytes, needle) {
  let found = -1;
  outer: for (let i = 0; i + needle.length <= bytes.length; i++) {
    if (bytes[i] !== needle[0]) continue;
    for (let j = 1; j < needle.length; j++) if (bytes[i + j] !== needle[j]) continue outer;
    if (found >= 0) return -2;
    found = i;
  }
  return found;
}

/** Whether the optimizer graph carries the baked schedule (bundles exported before it do not). */
export function hasBakedSchedule(optimizerBytes) { return findOnce(optimizerBytes, MAGIC) >= 0; }

/**
 * A copy of the optimizer model whose learning rate at run step `stepOffset + step` is
 * TrainConfig.learning_rate_at: {learningRate, schedule, warmupSteps, totalSteps, stepOffset}.
 */
export function withSchedule(optimizerBytes, { learningRate, schedule = "constant", warmupSteps = 0, totalSteps = 1, stepOffset = 0 }) {
  if (!(learningRate > 0)) throw new BundleError(`learningRate must be positive, got ${learningRate}`);
  if (!(schedule in SCHEDULES)) throw new BundleError(`schedule must be one of ${Object.keys(SCHEDULES)}, got ${schedule}`);
  const at = findOnce(optimizerBytes, MAGIC);
  if (at === -1) {
    throw new BundleError("the bundle's optimizer graph has no baked learning-rate table (exported before edgepeft " +
      "0.1 web support): re-export it, or train at ONNX Runtime Web's fixed learning rate 1e-3");
  }
  if (at === -2) throw new BundleError("the optimizer graph holds the learning-rate marker twice");
  const out = optimizerBytes.slice();
  const view = new DataView(out.buffer, out.byteOffset + at + MAGIC.length, 32);
  const values = [1, learningRate, warmupSteps, totalSteps, SCHEDULES[schedule], stepOffset, 0, 0];
  values.forEach((v, i) => view.setFloat32(i * 4, v, true));
  return out;
}

/** TrainConfig.learning_rate_at in JS (for display; the graph computes the one that trains). */
export function learningRateAt(step, total, { learningRate, schedule = "constant", warmupSteps = 0 }) {
  if (step < warmupSteps) return learningRate * (step + 1) / (warmupSteps + 1);
  if (schedule === "constant") return learningRate;
  const progress = (step - warmupSteps) / Math.max(1, total - warmupSteps);
  if (schedule === "linear") return learningRate * Math.max(0, 1 - progress);
  return learningRate * 0.5 * (1 + Math.cos(Math.PI * Math.min(1, progress)));
}
