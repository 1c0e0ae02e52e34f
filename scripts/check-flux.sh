#!/usr/bin/env bash
# Static check of the Flux files in nginx-conf/influxdb/ (no InfluxDB 2.x needed): each file is
# parsed and type-checked against Flux's standard library by Flux's own Rust front end, in the
# WebAssembly build that the npm package @influxdata/flux-lsp-browser ships (pinned below).
# This catches syntax errors, unknown functions, and missing, misspelt or unexpected arguments;
# it cannot run a query, so what the files compute is checked by reading, not here.
#
# Needs node and npm (and the npm registry once; the package is cached in target/flux-check).
# Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

version=0.8.40
dir="$root/target/flux-check"
pkg="$dir/node_modules/@influxdata/flux-lsp-browser"
mkdir -p "$dir"
if [ ! -f "$pkg/flux-lsp-browser_bg.wasm" ]; then
    echo "==> installing @influxdata/flux-lsp-browser@$version into $dir" >&2
    (cd "$dir" && npm install --no-save --no-audit --no-fund --silent \
        "@influxdata/flux-lsp-browser@$version" >/dev/null)
fi

# The package's JavaScript glue imports its .wasm as an ES module, which node cannot; load it
# by hand instead: the glue with that import replaced by a setter called after instantiating.
sed -e "s#^import \* as wasm from './flux-lsp-browser_bg.wasm';#let wasm;#" \
    -e 's#^cachedInt32Memory0 = new Int32Array(wasm.memory.buffer);#export function __setWasm(w) { wasm = w; cachedInt32Memory0 = new Int32Array(wasm.memory.buffer);#' \
    -e 's#^cachedUint8Memory0 = new Uint8Array(wasm.memory.buffer);#cachedUint8Memory0 = new Uint8Array(wasm.memory.buffer); }#' \
    "$pkg/flux-lsp-browser_bg.js" > "$dir/glue.mjs"
grep -q '__setWasm' "$dir/glue.mjs" || { echo "unexpected glue in $pkg" >&2; exit 1; }

cat > "$dir/check.mjs" <<'JS'
import * as glue from './glue.mjs';
import { readFileSync } from 'fs';
const wasmPath = './node_modules/@influxdata/flux-lsp-browser/flux-lsp-browser_bg.wasm';
const { instance } = await WebAssembly.instantiate(
    readFileSync(new URL(wasmPath, import.meta.url)), { './flux-lsp-browser_bg.js': glue });
glue.__setWasm(instance.exports);

// Diagnostics (with positions) from the language server, for files that fail the check.
async function diagnostics(files) {
    const lsp = new glue.Lsp();
    const found = {};
    lsp.onMessage((message) => {
        const m = JSON.parse(message);
        if (m.method === 'textDocument/publishDiagnostics') found[m.params.uri] = m.params.diagnostics;
    });
    lsp.run().catch(() => {});
    await lsp.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'initialize', params: { capabilities: {} } }));
    for (const f of files) {
        await lsp.send(JSON.stringify({ jsonrpc: '2.0', method: 'textDocument/didOpen', params: {
            textDocument: { uri: 'file://' + f, languageId: 'flux', version: 1, text: readFileSync(f, 'utf8') } } }));
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
    return found;
}

const files = process.argv.slice(2);
const bad = files.filter((f) => !new glue.Flux(readFileSync(f, 'utf8')).is_valid());
for (const f of files) console.log(`${bad.includes(f) ? 'INVALID' : 'ok     '} ${f}`);
if (bad.length > 0) {
    const found = await diagnostics(bad);
    for (const f of bad) {
        for (const d of found['file://' + f] || []) {
            console.log(`${f}:${d.range.start.line + 1}:${d.range.start.character + 1}: ${d.message}`);
        }
    }
    process.exit(1);
}
process.exit(0);
JS

cd "$dir"
node check.mjs "$root"/nginx-conf/influxdb/*.flux 2> >(grep -v -e 'language server initialized' -e 'set a logger' >&2)
