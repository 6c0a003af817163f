#!/usr/bin/env bash
# Rebuild the views bundle from source with the locked dependencies and fail if it differs,
# byte for byte, from the committed tl_latentspaces/static/views.iife.js.
#
#   bash js/check_bundle.sh            (from anywhere; needs node >= 18 and npm)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
committed="$here/../tl_latentspaces/static/views.iife.js"
cd "$here"
npm ci --no-audit --no-fund --loglevel=error
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
npx --no-install tsc --noEmit -p .
node build.mjs --out "$tmp/views.iife.js" >/dev/null
if cmp -s "$tmp/views.iife.js" "$committed"; then
  echo "bundle OK: tl_latentspaces/static/views.iife.js matches a fresh build ($(wc -c <"$committed") bytes)"
else
  echo "bundle MISMATCH: tl_latentspaces/static/views.iife.js differs from a fresh build of js/src." >&2
  echo "Rebuild it with: (cd js && npm ci && npm run build), and commit the result." >&2
  cmp "$tmp/views.iife.js" "$committed" >&2 || true
  exit 1
fi
