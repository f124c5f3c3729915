// edgepeft's JavaScript device runtime (ES module): open a bundle, tokenize, train, evaluate, predict, save adapters.
// The caller passes ONNX Runtime Web's training build as `ort` (a page: dist/ort.training.wasm.min.mjs; Node: see
// node.js, which loads it by path because the package's exports map hides ./training from Node).
export { openBundle, urlReader, sha256Hex, BundleError } from "./bundle.js";
export { TextEncoder } from "./tokenizer.js";
export { WebSession, CancelledError, epochOrder } from "./session.js";
export { withSchedule, learningRateAt, hasBakedSchedule } from "./lr.js";
export { adapterFiles, readAdapter, adapterConfig } from "./adapter.js";
export { parseTable } from "./data.js";
