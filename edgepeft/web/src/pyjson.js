// JSON as Python's json.dumps writes it (sort_keys, ensure_ascii), for the checksums the Python runtime checks.

function escape(text) {
  return JSON.stringify(text).replace(/[\u007f-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

/**
 * Python's json.dumps(value, sort_keys=True, separators=(",", ":")) (indent: json.dumps(indent=n, sort_keys=True)).
 * `floats` names keys whose integral numbers Python holds as floats (written "16.0").
 */
export function pyDumps(value, { indent = null, floats = new Set() } = {}, depth = 0, key = null) {
  const nl = indent == null ? "" : "\n" + " ".repeat(indent * (depth + 1));
  const end = indent == null ? "" : "\n" + " ".repeat(indent * depth);
  const colon = indent == null ? ":" : ": ";
  const comma = indent == null ? "," : ",";
  if (value === null || value === undefined) return "null";
  if (value === true) return "true";
  if (value === false) return "false";
  if (typeof value === "number") {
    if (Number.isInteger(value) && floats.has(key)) return value.toFixed(1);
    return JSON.stringify(value);
  }
  if (typeof value === "string") return escape(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[" + nl + value.map((v) => pyDumps(v, { indent, floats }, depth + 1, key)).join(comma + nl) + end + "]";
  }
  const keys = Object.keys(value).sort();
  if (!keys.length) return "{}";
  return "{" + nl + keys.map((k) => escape(k) + colon + pyDumps(value[k], { indent, floats }, depth + 1, k)).join(comma + nl) + end + "}";
}

/** Keys of `peft_config` whose numbers the manifest's text writes as floats (16.0): JSON.parse loses that. */
export function floatKeys(manifestText) {
  const keys = new Set();
  for (const m of manifestText.matchAll(/"([A-Za-z_]+)"\s*:\s*-?\d+\.\d*(?:[eE][-+]?\d+)?\b/g)) keys.add(m[1]);
  return keys;
}
