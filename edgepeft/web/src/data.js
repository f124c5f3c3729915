// Local data files read in the page (File API) or under Node: CSV/TSV (RFC 4180 quoting) and JSONL of text + label.

/** Parse CSV/TSV text into rows of fields. */
function parseDelimited(text, delimiter) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"') { if (text[i + 1] === '"') { field += '"'; i++; } else quoted = false; }
      else field += c;
    } else if (c === '"' && field === "") quoted = true;
    else if (c === delimiter) { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); field = "";
      if (row.length > 1 || row[0] !== "") rows.push(row);
      row = [];
    } else field += c;
  }
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  return rows;
}

/**
 * A data file's text into {texts, labels} (labels null if there is no label column). `name` decides the format
 * (.jsonl/.json lines, .tsv, else CSV). Errors name the file, the row and the column.
 */
export function parseTable(text, name, { textColumn = "text", labelColumn = "label" } = {}) {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  let records;
  if (/\.jsonl?$/i.test(name)) {
    records = text.split(/\r?\n/).map((line, i) => [line, i]).filter(([l]) => l.trim()).map(([line, i]) => {
      try { return JSON.parse(line); } catch (e) { throw new Error(`${name} line ${i + 1} is not JSON: ${e.message}`); }
    });
  } else {
    const rows = parseDelimited(text, /\.tsv$/i.test(name) ? "\t" : ",");
    if (!rows.length) throw new Error(`${name} is empty`);
    const header = rows[0];
    records = rows.slice(1).map((r) => Object.fromEntries(header.map((h, i) => [h, r[i]])));
  }
  if (!records.length) throw new Error(`${name} holds no rows`);
  if (!(textColumn in records[0])) throw new Error(`${name} has no \`${textColumn}\` column (found ${Object.keys(records[0]).join(", ")})`);
  const texts = records.map((r, i) => {
    const t = r[textColumn];
    if (typeof t !== "string" || !t.trim()) throw new Error(`${name} row ${i + 1}: \`${textColumn}\` is missing or empty`);
    return t;
  });
  const labels = labelColumn in records[0] ? records.map((r) => String(r[labelColumn])) : null;
  return { texts, labels };
}
