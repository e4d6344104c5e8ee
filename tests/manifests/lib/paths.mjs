// Schema paths as upstream.json writes them: ".spec.x" for a property,
// "[*]" for every list item, "{*}" for every map value.

const parsed = new Map();
export function parsePattern(pattern) {
  if (!parsed.has(pattern)) parsed.set(pattern, parse(pattern));
  return parsed.get(pattern);
}

function parse(pattern) {
  const out = [];
  const re = /\.([^.[{]+)|\[\*\]|\{\*\}/g;
  let m;
  let at = 0;
  while ((m = re.exec(pattern))) {
    if (m.index !== at) throw new Error(`bad schema path ${pattern}`);
    at = re.lastIndex;
    out.push(m[1] !== undefined ? { key: m[1] } : m[0] === "[*]" ? { items: true } : { values: true });
  }
  if (at !== pattern.length) throw new Error(`bad schema path ${pattern}`);
  return out;
}

// Every node of `doc` at the schema path: [{value, segments}].
export function nodesAt(doc, pattern) {
  let cur = [{ value: doc, segments: [] }];
  for (const seg of parsePattern(pattern)) {
    const next = [];
    for (const { value, segments } of cur) {
      if (seg.key !== undefined) {
        if (value && typeof value === "object" && !Array.isArray(value) && Object.hasOwn(value, seg.key)) {
          next.push({ value: value[seg.key], segments: [...segments, seg.key] });
        }
      } else if (seg.items) {
        if (Array.isArray(value)) value.forEach((v, i) => next.push({ value: v, segments: [...segments, i] }));
      } else if (value && typeof value === "object" && !Array.isArray(value)) {
        for (const [k, v] of Object.entries(value)) next.push({ value: v, segments: [...segments, k] });
      }
    }
    cur = next;
  }
  return cur;
}

// Does the schema path match these concrete segments?
export function matches(pattern, segments) {
  const segs = parsePattern(pattern);
  if (segs.length !== segments.length) return false;
  return segs.every((s, i) => {
    const c = segments[i];
    if (s.key !== undefined) return c === s.key;
    if (s.items) return typeof c === "number";
    return typeof c === "string";
  });
}
