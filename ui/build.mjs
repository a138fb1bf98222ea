// Builds ui/dist: the app bundled by esbuild (Preact, xterm.js, uPlot; the CSS they
// import lands in app.css), noVNC copied
// unbundled as ES modules (its top-level await breaks bundling; the page imports it at
// run time from /ui/novnc/core/rfb.js). Everything is served by `ferry serve` from the
// binary; nothing is fetched from elsewhere.
import * as esbuild from 'esbuild';
import { cpSync, mkdirSync, rmSync, copyFileSync } from 'node:fs';

const dist = new URL('./dist/', import.meta.url).pathname;
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });
await esbuild.build({
  entryPoints: ['src/main.tsx'],
  bundle: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  sourcemap: false,
  outfile: `${dist}app.js`,
  jsx: 'automatic',
  jsxImportSource: 'preact',
  external: ['/ui/novnc/*'],
  logLevel: 'warning',
  legalComments: 'none',
});
copyFileSync('src/index.html', `${dist}index.html`);
copyFileSync('src/favicon.svg', `${dist}favicon.svg`);
for (const d of ['core', 'vendor']) {
  cpSync(`node_modules/@novnc/novnc/${d}`, `${dist}novnc/${d}`, { recursive: true });
}
copyFileSync('node_modules/@novnc/novnc/LICENSE.txt', `${dist}novnc/LICENSE.txt`);
console.log('ui/dist built');
