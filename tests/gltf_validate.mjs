// Validate glTF/GLB files with the Khronos glTF-Validator (npm package `gltf-validator`).
// Usage: node tests/gltf_validate.mjs FILE... ; prints one JSON report summary per file on stdout
// ({"file", "numErrors", "numWarnings", "numInfos", "numHints", "errors": [first messages]}) and
// exits 0 when every file has no errors, 1 when any has errors, 2 when the validator is missing.
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "package.json"));
let validator;
try {
  validator = require("gltf-validator");
} catch (err) {
  console.error(`gltf-validator is not installed: npm install --prefix ${here} (${err.code || err.message})`);
  process.exit(2);
}

let failed = false;
for (const file of process.argv.slice(2)) {
  const data = new Uint8Array(await readFile(file));
  const report = await validator.validateBytes(data, { uri: path.basename(file), maxIssues: 100 });
  const issues = report.issues;
  const errors = issues.messages.filter((m) => m.severity === 0).slice(0, 10);
  console.log(JSON.stringify({
    file,
    validatorVersion: report.validatorVersion,
    numErrors: issues.numErrors,
    numWarnings: issues.numWarnings,
    numInfos: issues.numInfos,
    numHints: issues.numHints,
    errors: errors.map((m) => `${m.code} ${m.pointer || ""}: ${m.message}`),
    warnings: issues.messages.filter((m) => m.severity === 1).slice(0, 10).map((m) => `${m.code} ${m.pointer || ""}: ${m.message}`),
  }));
  if (issues.numErrors > 0) failed = true;
}
process.exit(failed ? 1 : 0);
