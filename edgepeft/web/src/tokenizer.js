// Tokenize text with the bundle's own tokenizer.json, as the Python runtime does (tokenizers' encode_batch,
// truncated to the manifest's max_length, special tokens added by the post-processor, padded per batch).
import { Tokenizer } from "@huggingface/tokenizers";
import { BundleError, TOKENIZER } from "./bundle.js";

const FIELDS = ["input_ids", "attention_mask", "token_type_ids"];

/** The special tokens a post-processor adds around one sequence: [{id, typeId} | "A"] in order. */
function singleTemplate(post) {
  if (post == null) return ["A"];
  if (post.type === "TemplateProcessing") {
    return post.single.map((item) => {
      if (item.Sequence) return { seq: true, typeId: item.Sequence.type_id };
      const token = post.special_tokens[item.SpecialToken.id];
      if (!token || token.ids.length !== 1) throw new BundleError(`tokenizer special token ${item.SpecialToken.id} is not one id`);
      return { id: token.ids[0], typeId: item.SpecialToken.type_id };
    });
  }
  if (post.type === "BertProcessing" || post.type === "RobertaProcessing") {
    return [{ id: post.cls[1], typeId: 0 }, { seq: true, typeId: 0 }, { id: post.sep[1], typeId: 0 }];
  }
  throw new BundleError(`tokenizer post-processor ${post.type} is not supported by the web runtime`);
}

export class TextEncoder {
  /** @param {object} bundle from openBundle */
  constructor(bundle) {
    const { manifest, files } = bundle;
    if (!files[TOKENIZER]) throw new BundleError(`bundle has no ${TOKENIZER}: it takes arrays, not text`);
    const unknown = manifest.inputs.map((s) => s.name).filter((n) => !FIELDS.includes(n));
    if (unknown.length) throw new BundleError(`bundle inputs ${unknown} cannot be made from text`);
    const json = JSON.parse(new globalThis.TextDecoder().decode(files[TOKENIZER]));
    this.tokenizer = new Tokenizer(json, {});
    this.template = singleTemplate(json.post_processor);
    this.added = this.template.filter((t) => !t.seq).length;
    this.maxLength = manifest.max_length || json.truncation?.max_length || null;
    this.padId = json.padding?.pad_id ?? 0;
    this.padTypeId = json.padding?.pad_type_id ?? 0;
    this.inputs = manifest.inputs.map((s) => s.name);
  }

  /** One text -> {ids, typeIds}, truncated so that with its special tokens it holds at most maxLength. */
  encodeOne(text) {
    let ids = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    if (this.maxLength) ids = ids.slice(0, Math.max(0, this.maxLength - this.added));
    const out = [], types = [];
    for (const part of this.template) {
      if (part.seq) { for (const id of ids) { out.push(id); types.push(part.typeId); } }
      else { out.push(part.id); types.push(part.typeId); }
    }
    return { ids: out, typeIds: types };
  }

  /** Texts -> unpadded encodings (pad a batch with `padBatch`). */
  encode(texts) { return texts.map((t) => this.encodeOne(t)); }

  /** Encodings -> the bundle's int64 inputs as {name: {data: BigInt64Array, dims}}, padded to the batch's longest. */
  padBatch(encodings) {
    const rows = encodings.length;
    const length = Math.max(1, ...encodings.map((e) => e.ids.length));
    const arrays = {
      input_ids: new BigInt64Array(rows * length).fill(BigInt(this.padId)),
      attention_mask: new BigInt64Array(rows * length),
      token_type_ids: new BigInt64Array(rows * length).fill(BigInt(this.padTypeId)),
    };
    encodings.forEach((e, r) => {
      for (let i = 0; i < e.ids.length; i++) {
        arrays.input_ids[r * length + i] = BigInt(e.ids[i]);
        arrays.attention_mask[r * length + i] = 1n;
        arrays.token_type_ids[r * length + i] = BigInt(e.typeIds[i]);
      }
    });
    const result = {};
    for (const name of this.inputs) result[name] = { data: arrays[name], dims: [rows, length] };
    return result;
  }
}
