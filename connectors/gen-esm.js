#!/usr/bin/env node
'use strict';
// Writes apm_module.node.mjs from apm_module.node.js, so that the ES module
// connector is never a second hand-maintained copy: the prologue's require
// lines become imports, the shared body is copied byte for byte, and
// module.exports becomes export default.
//
//   node connectors/gen-esm.js           regenerate the .mjs
//   node connectors/gen-esm.js --check   exit 1 if the .mjs is not what this would write
const fs = require('fs');
const path = require('path');

const SRC = path.join(__dirname, 'apm_module.node.js');
const DST = path.join(__dirname, 'apm_module.node.mjs');
const BEGIN = '// ---- shared body: apm_module.node.mjs is generated from this file ----';
const END = '// ---- end of shared body ----';
const EXPORT_CJS = 'module.exports = ApmModule;';
const EXPORT_ESM = 'export default ApmModule;';

function generate(text) {
  const lines = text.split('\n');
  const begin = lines.indexOf(BEGIN);
  const end = lines.indexOf(END);
  if (begin < 0 || end < begin) throw new Error('the shared-body markers are missing or out of order');
  const imports = [];
  for (const line of lines.slice(0, begin)) {
    if (line === "'use strict';" || line.trim() === '' || line.startsWith('//')) continue;
    const m = /^const (\w+) = require\('([\w:./-]+)'\);$/.exec(line);
    // Anything else in the prologue would silently be missing from the .mjs.
    if (!m) throw new Error('the prologue may hold only `const x = require(\'y\');` lines, found: ' + line);
    imports.push('import ' + m[1] + " from '" + m[2] + "';");
  }
  const tail = lines.slice(end + 1).filter((l) => l.trim() !== '');
  if (tail.length !== 1 || tail[0] !== EXPORT_CJS) {
    throw new Error('after the shared body there must be only `' + EXPORT_CJS + '`');
  }
  return [
    '// Generated from apm_module.node.js by connectors/gen-esm.js: edit that file, then run `node connectors/gen-esm.js`.',
    '// ---- prologue: ES module ----',
  ]
    .concat(imports, lines.slice(begin, end + 1), [EXPORT_ESM, ''])
    .join('\n');
}

function main() {
  const check = process.argv.includes('--check');
  let want;
  try {
    want = generate(fs.readFileSync(SRC, 'utf8'));
  } catch (e) {
    process.stderr.write('gen-esm: ' + path.basename(SRC) + ': ' + e.message + '\n');
    process.exit(1);
  }
  if (!check) {
    fs.writeFileSync(DST, want);
    return;
  }
  let have = null;
  try {
    have = fs.readFileSync(DST, 'utf8');
  } catch (e) {
    // a missing file is as out of date as a stale one
  }
  if (have !== want) {
    process.stderr.write('gen-esm: ' + path.basename(DST) + ' is out of date; run `node connectors/gen-esm.js`\n');
    process.exit(1);
  }
}

main();
