// Validates custom resources against their operators' CRD schemas, as the API server would (the
// @kubernetes-models packages of package.json, generated from the CRDs' openAPIV3Schema). Reads a JSON
// array of resources on stdin and writes a JSON array of the same length: for each resource the list of
// what is wrong with it (empty: valid). Two checks, since the packages' JSON-schema validators do not
// close their objects: (1) that validator (types, enums, patterns, required fields), e.g.
// "data/spec/partitions must be integer"; (2) TypeScript's check of the resource as an object literal
// of the kind's interface (which the package declares from the same schema), whose excess-property
// check rejects an unknown field, e.g. "unknown field: '"partitons"' does not exist in type ..." (a
// field with x-kubernetes-preserve-unknown-fields, such as a KafkaTopic's config, is typed {} and
// takes any key). Run by tests/test_k8s_schema.py.
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

// The API group of each operator this project deploys with (k8s/00-namespace.yaml) and its package.
const PACKAGES = {
  "kafka.strimzi.io": "@kubernetes-models/strimzi-kafka-operator",
  "postgresql.cnpg.io": "@kubernetes-models/cloudnative-pg",
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};
const HERE = path.dirname(fileURLToPath(import.meta.url));

function modelPath(resource) {
  const [group, version] = String(resource.apiVersion).split("/");
  const pkg = PACKAGES[group];
  return pkg === undefined ? null : `${pkg}/${group}/${version}`;
}

async function schemaErrors(resource) {
  const where = modelPath(resource);
  if (where === null) return [`no CRD schema package for the apiVersion ${resource.apiVersion}`];
  let models;
  try {
    models = await import(where);
  } catch (e) {
    return [`no schema for ${resource.apiVersion} (${where}): ${e.message}`];
  }
  const Model = models[resource.kind];
  if (Model === undefined) return [`no kind ${resource.kind} in ${where}`];
  try {
    new Model(resource).validate();
    return [];
  } catch (e) {
    return [e.message];
  }
}

function typeErrors(resources) {
  // one declaration per resource in a virtual file beside node_modules; each line's owner is remembered
  const lines = [];
  const owner = [];
  resources.forEach((resource, i) => {
    const where = modelPath(resource);
    if (where === null || !/^[A-Za-z]+$/.test(resource.kind)) return;
    const type = `import("${where}/${resource.kind}").I${resource.kind}`;
    for (const line of `export const r${i}: ${type} = ${JSON.stringify(resource, null, 1)};`.split("\n")) {
      lines.push(line);
      owner.push(i);
    }
  });
  const file = path.join(HERE, "__resources__.ts");
  const source = lines.join("\n");
  const options = {
    strict: true, noEmit: true, skipLibCheck: true, types: [], target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext, moduleResolution: ts.ModuleResolutionKind.Bundler,
  };
  const host = ts.createCompilerHost(options);
  const { fileExists, readFile, getSourceFile } = host;
  host.fileExists = (f) => f === file || fileExists(f);
  host.readFile = (f) => (f === file ? source : readFile(f));
  host.getSourceFile = (f, language, ...rest) =>
    f === file ? ts.createSourceFile(f, source, language) : getSourceFile(f, language, ...rest);
  const found = resources.map(() => []);
  for (const diagnostic of ts.getPreEmitDiagnostics(ts.createProgram([file], options, host))) {
    const text = ts.flattenDiagnosticMessageText(diagnostic.messageText, "\n").split("\n").pop();
    if (diagnostic.file?.fileName !== file) throw new Error(`the CRD types do not compile: ${text}`);
    const { line } = diagnostic.file.getLineAndCharacterOfPosition(diagnostic.start);
    found[owner[line]].push(text.replace("Object literal may only specify known properties, and ", "unknown field: ")
      .slice(0, 300));
  }
  return found;
}

const resources = JSON.parse(readFileSync(0, "utf8"));
const typed = typeErrors(resources);
const results = [];
for (const [i, resource] of resources.entries()) results.push([...(await schemaErrors(resource)), ...typed[i]]);
process.stdout.write(JSON.stringify(results));
