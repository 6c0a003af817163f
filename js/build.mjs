// Bundle src/index.ts into one self-contained IIFE script (React included) that defines the
// global `TLLatentSpaces`, the way CircuitsVis builds its `dist/cdn/iife.js`.
//
//   node build.mjs                 writes ../tl_latentspaces/static/views.iife.js
//   node build.mjs --out FILE      writes FILE instead (check_bundle.sh compares the two)
//
// The output depends only on the sources and the exact versions in package-lock.json: no
// source map, no timestamps, no absolute paths, so a rebuild is byte-for-byte identical.
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const outIndex = args.indexOf("--out");
const outfile =
  outIndex >= 0 ? path.resolve(args[outIndex + 1]) : path.join(here, "..", "tl_latentspaces", "static", "views.iife.js");

await esbuild.build({
  absWorkingDir: here,
  entryPoints: ["src/index.ts"],
  outfile,
  bundle: true,
  format: "iife",
  globalName: "TLLatentSpaces", // components available as e.g. `TLLatentSpaces.LensGrid`
  platform: "browser",
  target: "es2019",
  minify: true,
  sourcemap: false,
  charset: "ascii", // \uXXXX escapes: the bundle is safe to inline in any page encoding
  legalComments: "eof", // keep React's licence notices
  jsx: "automatic",
  define: { "process.env.NODE_ENV": '"production"' },
  banner: {
    js: "/* tl_latentspaces views bundle: generated from js/ by `npm run build`; do not edit by hand. */",
  },
  logLevel: "warning",
});
console.log(`wrote ${path.relative(process.cwd(), outfile)}`);
