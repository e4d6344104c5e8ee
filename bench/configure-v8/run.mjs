// Times keyswap's configure (Policy::from_json) in V8, node's wasm engine
// and Envoy's: `node run.mjs CONFIG.json ROUNDS NAME=WASM [NAME=WASM ...]`.
// Each round starts every module fresh (alternating their order), copies
// the configuration into it, then configures 6 times: the first load
// (code still tiering up) and the median of the 5 later ones, in process
// CPU time (user + system, so a busy machine's waiting is not counted).
// Prints the medians over rounds, the memory the loads grew the module by
// (wasm memory never shrinks: the high-water mark), and, with two modules,
// the median of the paired per-round ratios.
import { readFileSync } from 'node:fs';
import { WASI } from 'node:wasi';

const [configPath, rounds, ...specs] = process.argv.slice(2);
if (!configPath || !rounds || specs.length === 0) {
  console.error('usage: node run.mjs CONFIG.json ROUNDS NAME=WASM [NAME=WASM ...]');
  process.exit(2);
}
const config = readFileSync(configPath);
const modules = specs.map((s) => { const i = s.indexOf('='); return { name: s.slice(0, i), bytes: readFileSync(s.slice(i + 1)) }; });

async function round(bytes) {
  const wasi = new WASI({ version: 'preview1', env: {} });
  const { instance } = await WebAssembly.instantiate(bytes, wasi.getImportObject());
  wasi.initialize(instance);
  const e = instance.exports;
  const at = e.config_buffer(config.length); // may grow memory: read the buffer after
  new Uint8Array(e.memory.buffer, at, config.length).set(config);
  const before = e.memory.buffer.byteLength;
  const times = [];
  for (let i = 0; i < 6; i++) {
    const start = process.cpuUsage();
    if (e.configure() !== 1) throw new Error('the configuration was refused');
    const used = process.cpuUsage(start);
    times.push((used.user + used.system) / 1000);
  }
  return { first: times[0], later: median(times.slice(1)), grew: (e.memory.buffer.byteLength - before) / 1048576 };
}
const median = (a) => { const s = [...a].sort((x, y) => x - y); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };

const results = modules.map(() => []);
for (let r = 0; r < +rounds; r++) {
  const order = modules.map((_, i) => i);
  if (r % 2) order.reverse();
  for (const i of order) results[i].push(await round(modules[i].bytes));
}
console.log(`configure in V8 (node ${process.version}), ${configPath} (${(config.length / 1048576).toFixed(2)} MiB), ${rounds} rounds, CPU ms`);
console.log('| module | first load | later loads | memory grown by the loads |');
console.log('|---|---:|---:|---:|');
modules.forEach((m, i) => {
  const rs = results[i];
  console.log(`| ${m.name} | ${median(rs.map((x) => x.first)).toFixed(1)} | ${median(rs.map((x) => x.later)).toFixed(1)} | ${median(rs.map((x) => x.grew)).toFixed(1)} MiB |`);
});
if (modules.length === 2) {
  const ratio = (k) => median(results[1].map((x, r) => x[k] / results[0][r][k])).toFixed(2);
  console.log(`paired ratio ${modules[1].name} / ${modules[0].name}: first load ${ratio('first')}, later loads ${ratio('later')}`);
}
