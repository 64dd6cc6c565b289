// Builds the dashboard into dist/ (checked in; the binary embeds it), and copies
// Swagger UI's distribution beside it for /docs: everything is served by strata
// itself, nothing comes from a CDN.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { defineConfig, type Plugin } from 'vite';

const here = (path: string) => fileURLToPath(new URL(path, import.meta.url));

/** dist/docs/: Swagger UI's script and style, and the page that starts it. */
function apiDocs(): Plugin {
  const swagger = (file: string) => here(`node_modules/swagger-ui-dist/${file}`);
  const files: Record<string, string> = {
    'docs/index.html': here('docs/index.html'),
    'docs/init.js': here('docs/init.js'),
    'docs/swagger-ui-bundle.js': swagger('swagger-ui-bundle.js'),
    'docs/swagger-ui.css': swagger('swagger-ui.css'),
    'docs/LICENSE': swagger('LICENSE'),
  };
  return {
    name: 'strata-api-docs',
    generateBundle() {
      for (const [fileName, source] of Object.entries(files)) {
        this.emitFile({ type: 'asset', fileName, source: readFileSync(source) });
      }
    },
  };
}

export default defineConfig({
  plugins: [apiDocs()],
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    // One small bundle; source maps would double what the binary embeds.
    sourcemap: false,
    reportCompressedSize: false,
  },
});
