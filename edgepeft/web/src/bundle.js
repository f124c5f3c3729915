// Open an edgepeft bundle from its files alone: manifest.json, the ONNX graphs, the checkpoint, the tokenizer.
// Every file read is checked against the manifest's sha256 with WebCrypto before it is used.

/** The files a web runtime needs (inference.onnx is not: evaluation and prediction run the eval graph). */
export const NEEDED = ["training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "adapter_config.json"];
export const TOKENIZER = "tokenizer.json";
export const SCHEMA_VERSIONS = [1, 2, 3];

export class BundleError extends Error {
  constructor(message) { super(message); this.name = "BundleError"; }
}

/** Hex sha256 of bytes (WebCrypto: a browser's secure context, 127.0.0.1 included, or Node >= 18). */
export async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A reader over HTTP: `read(name)` fetches `base + name` from the same origin. */
export function urlReader(base) {
  const root = base.endsWith("/") ? base : base + "/";
  return async (name) => {
    const response = await fetch(root + encodeURIComponent(name));
    if (!response.ok) throw new BundleError(`bundle file ${name} cannot be fetched (${response.status})`);
    return new Uint8Array(await response.arrayBuffer());
  };
}

/**
 * Open a bundle through `read(name) -> Uint8Array`: read the manifest, check it is a classifier/regressor bundle
 * this runtime trains, fetch and verify each file it needs. `onFile(name, bytes)` reports progress.
 */
export async function openBundle(read, { verify = true, onFile = null } = {}) {
  const manifestBytes = await read("manifest.json");
  const manifestText = new TextDecoder().decode(manifestBytes);
  let manifest;
  try { manifest = JSON.parse(manifestText); } catch (e) { throw new BundleError(`bundle manifest.json is not JSON: ${e.message}`); }
  if (!SCHEMA_VERSIONS.includes(manifest.schema_version)) {
    throw new BundleError(`bundle manifest schema version ${manifest.schema_version} is not supported (this runtime reads ${SCHEMA_VERSIONS})`);
  }
  if (manifest.task) throw new BundleError(`bundle task ${manifest.task.kind}: the web runtime trains classifiers and regressors only`);
  if (manifest.preprocessing) throw new BundleError("bundle takes images (preprocessing): the web runtime reads text and arrays only");
  const wanted = [...NEEDED, ...(TOKENIZER in manifest.files ? [TOKENIZER] : [])];
  const files = {};
  for (const name of wanted) {
    if (!(name in manifest.files)) throw new BundleError(`bundle manifest does not list ${name}`);
    const bytes = await read(name);
    if (verify) {
      const digest = await sha256Hex(bytes);
      if (digest !== manifest.files[name]) throw new BundleError(`bundle file ${name} is corrupted: its sha256 differs from the manifest`);
    }
    files[name] = bytes;
    if (onFile) onFile(name, bytes);
  }
  return { manifest, manifestText, files };
}
