// Save trainable values as a PEFT adapter, byte for byte the layout edgepeft/runtime/adapter.py writes:
// adapter_config.json + adapter_model.safetensors with the base fingerprint and checksums in its metadata.
import { sha256Hex } from "./bundle.js";
import { floatKeys, pyDumps } from "./pyjson.js";

export const WEIGHTS = "adapter_model.safetensors";
export const ADAPTER_CONFIG = "adapter_config.json";
export const FINGERPRINT_KEY = "edgepeft.base_fingerprint";
export const CHECKSUM_KEY = "edgepeft.sha256";
export const CONFIG_CHECKSUM_KEY = "edgepeft.config_fields_sha256";
export const VERSION = "0.1.0";
export const SHAPING_FIELDS = [
  "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules",
  "modules_to_save", "bias", "lora_bias", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
  "rank_pattern", "alpha_pattern", "layer_replication", "target_parameters", "trainable_token_indices",
];

/** runtime/adapter.py portable_base_name: a hub name as is, a path's last part. */
export function portableBaseName(name) {
  if (typeof name !== "string" || !name.trim()) return null;
  name = name.trim().replace(/[/\\]+$/, "");
  const parts = name.replace(/\\/g, "/").split("/");
  if (name.startsWith("/") || /^[A-Za-z]:/.test(name) || name.startsWith(".") || name.includes("\\") || (name.match(/\//g) || []).length > 1) {
    return parts[parts.length - 1] || null;
  }
  return name;
}

/** The adapter_config.json of adapters saved from this bundle (runtime/adapter.py adapter_config). */
export function adapterConfig(manifest) {
  const config = { ...manifest.peft_config };
  config.inference_mode = true;
  config.base_model_name_or_path = portableBaseName(config.base_model_name_or_path);
  return config;
}

const encoder = new TextEncoder();

function pyShape(shape) {
  return shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
}

/** runtime/adapter.py _checksum: sha256 over sorted keys of "key|float32|(shape)|" + the little-endian bytes. */
export async function tensorsChecksum(tensors) {
  const parts = [];
  for (const key of Object.keys(tensors).sort()) {
    const { data, shape } = tensors[key];
    parts.push(encoder.encode(`${key}|float32|${pyShape(shape)}|`), new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }
  return sha256Hex(concat(parts));
}

export async function configChecksum(config, fingerprint, floats) {
  const fields = {};
  for (const f of SHAPING_FIELDS) fields[f] = config[f] === undefined ? null : config[f];
  return sha256Hex(encoder.encode(pyDumps({ fields, fingerprint }, { floats })));
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** safetensors bytes: 8-byte header length, JSON header (padded with spaces to 8 bytes), the tensors' bytes. */
export function safetensorsBytes(tensors, metadata) {
  const header = { __metadata__: metadata };
  let offset = 0;
  const keys = Object.keys(tensors).sort();
  for (const key of keys) {
    const { data, shape } = tensors[key];
    header[key] = { dtype: "F32", shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
  }
  let json = encoder.encode(JSON.stringify(header));
  const padded = Math.ceil(json.length / 8) * 8;
  if (padded !== json.length) json = concat([json, encoder.encode(" ".repeat(padded - json.length))]);
  const size = new Uint8Array(8);
  new DataView(size.buffer).setBigUint64(0, BigInt(json.length), true);
  return concat([size, json, ...keys.map((k) => new Uint8Array(tensors[k].data.buffer, tensors[k].data.byteOffset, tensors[k].data.byteLength))]);
}

/**
 * The adapter files for trainable `values` ({onnxName: Float32Array}): {"adapter_config.json": bytes,
 * "adapter_model.safetensors": bytes}, loadable by peft.PeftModel.from_pretrained and TrainingSession.load_adapter.
 */
export async function adapterFiles(bundle, values) {
  const { manifest, manifestText } = bundle;
  const tensors = {};
  for (const spec of manifest.trainable) {
    const data = values[spec.name];
    const count = spec.shape.reduce((a, b) => a * b, 1);
    if (!data || data.length !== count) throw new Error(`trainable value ${spec.name} must hold ${count} floats`);
    tensors[spec.adapter_key] = { data: Float32Array.from(data), shape: spec.shape };
  }
  const config = adapterConfig(manifest);
  const floats = floatKeys(manifestText || "");
  const metadata = {
    format: "pt",
    [FINGERPRINT_KEY]: manifest.base_fingerprint,
    [CHECKSUM_KEY]: await tensorsChecksum(tensors),
    [CONFIG_CHECKSUM_KEY]: await configChecksum(config, manifest.base_fingerprint, floats),
    "edgepeft.version": VERSION,
  };
  return {
    [WEIGHTS]: safetensorsBytes(tensors, metadata),
    [ADAPTER_CONFIG]: encoder.encode(pyDumps(config, { indent: 2, floats }) + "\n"),
  };
}

/** Read an adapter's safetensors bytes back into {onnxName: Float32Array} (the fingerprint must be the bundle's). */
export function readAdapter(bundle, weightsBytes) {
  const view = new DataView(weightsBytes.buffer, weightsBytes.byteOffset, weightsBytes.byteLength);
  const size = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(weightsBytes.subarray(8, 8 + size)));
  const fingerprint = header.__metadata__?.[FINGERPRINT_KEY];
  if (fingerprint != null && fingerprint !== bundle.manifest.base_fingerprint) {
    throw new Error(`adapter was made for a different base model (fingerprint ${fingerprint.slice(0, 12)}...)`);
  }
  const values = {};
  for (const spec of bundle.manifest.trainable) {
    const entry = header[spec.adapter_key];
    if (!entry || entry.dtype !== "F32") throw new Error(`adapter has no float32 tensor ${spec.adapter_key}`);
    const [start, end] = entry.data_offsets;
    values[spec.name] = new Float32Array(weightsBytes.slice(8 + size + start, 8 + size + end).buffer);
  }
  return values;
}
