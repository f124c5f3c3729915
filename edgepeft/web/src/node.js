// Node entry: load ONNX Runtime Web's training build by path (its exports map blocks ./training under Node) and
// read a bundle directory from disk.
import { createRequire } from "node:module";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { openBundle } from "./bundle.js";

const here = path.dirname(fileURLToPath(import.meta.url));

/** onnxruntime-web's training build, from this package's node_modules (or `modules`). */
export function loadOrt({ modules = path.join(here, "..", "node_modules"), threads = 1 } = {}) {
  const require = createRequire(import.meta.url);
  const ort = require(path.join(modules, "onnxruntime-web", "dist", "ort.training.wasm.min.js"));
  ort.env.wasm.numThreads = threads;
  return ort;
}

export function openBundleDir(dir, options = {}) {
  return openBundle((name) => readFile(path.join(dir, name)).then((b) => new Uint8Array(b.buffer, b.byteOffset, b.byteLength)), options);
}
