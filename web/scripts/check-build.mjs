// Fails when the checked-in build is not what the sources build to: the generated API
// types (from openapi/openapi.json), the scope table, the type check, and dist/ file
// by file. Run by the Rust test suite (tests/api/dashboard.rs); `npm run build`
// brings everything up to date.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const web = fileURLToPath(new URL('..', import.meta.url));
const bin = (name) => join(web, 'node_modules/.bin', name);
const scratch = mkdtempSync(join(tmpdir(), 'strata-web-'));
const stale = [];

function files(dir) {
  return readdirSync(dir, { recursive: true })
    .map(String)
    .filter((path) => statSync(join(dir, path)).isFile())
    .sort();
}

function same(label, expected, actual) {
  if (!Buffer.from(readFileSync(expected)).equals(readFileSync(actual))) stale.push(label);
}

try {
  const run = (program, args) => execFileSync(program, args, { cwd: web, stdio: ['ignore', 'pipe', 'pipe'] });

  run(bin('openapi-typescript'), ['../openapi/openapi.json', '-o', join(scratch, 'schema.d.ts')]);
  same('src/api/schema.d.ts (from openapi/openapi.json)', join(scratch, 'schema.d.ts'), join(web, 'src/api/schema.d.ts'));
  run('node', ['scripts/gen-scopes.mjs', join(scratch, 'scopes.gen.ts')]);
  same('src/api/scopes.gen.ts (from openapi/openapi.json)', join(scratch, 'scopes.gen.ts'), join(web, 'src/api/scopes.gen.ts'));

  try {
    run(bin('tsc'), ['--noEmit']);
  } catch (e) {
    console.error(`the dashboard does not type-check:\n${e.stdout}${e.stderr}`);
    process.exit(1);
  }

  const built = join(scratch, 'dist');
  run(bin('vite'), ['build', '--outDir', built, '--logLevel', 'error']);
  const want = files(built);
  const have = files(join(web, 'dist'));
  for (const path of new Set([...want, ...have])) {
    if (!want.includes(path)) stale.push(`dist/${path} (not built any more)`);
    else if (!have.includes(path)) stale.push(`dist/${path} (missing)`);
    else same(`dist/${path}`, join(built, path), join(web, 'dist', path));
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}

if (stale.length > 0) {
  console.error(
    `the checked-in dashboard build is stale; run \`npm run build --prefix web\` and commit:\n  ${stale.map((s) => relative('.', s)).join('\n  ')}`,
  );
  process.exit(1);
}
console.log('web/dist, src/api/schema.d.ts and src/api/scopes.gen.ts are current');
