#!/usr/bin/env bash
# Install the browser libraries from the npm registry (package.json / package-lock.json:
# NiiVue for the subject page's 3D viewer) and copy the files the site serves into
# static/vendor/ (not in git). Run by `make install`, hence by `make test` and `make demo`.
# Nothing is fetched from a CDN at run time: the browser gets these files from the site.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null 2>&1; then
  echo "NOTE: npm is not installed: the subject page's 3D viewer is not available." >&2
  echo "      run as root: apt-get install nodejs npm   (then make install)" >&2
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
src=node_modules/@niivue/niivue
dst=static/vendor/niivue
version=$(node -p "require('./$src/package.json').version")
rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
cp "$src/dist/niivue.umd.js" "$dst.tmp/niivue.umd.js"
# NiiVue embeds its font sheet and matcap as data: URLs, which the site's
# Content-Security-Policy refuses; static/surveys/viewer3d.js loads these copies instead.
cp "$src/src/fonts/Roboto-Regular.png" "$src/src/matcaps/Shiny.jpg" "$dst.tmp/"
cat > "$dst.tmp/NOTICE.txt" <<NOTE
@niivue/niivue $version (BSD-2-Clause), https://github.com/niivue/niivue
installed from the npm registry by scripts/vendor_js.sh (package-lock.json pins it)
NOTE
rm -rf "$dst" && mv "$dst.tmp" "$dst"
touch node_modules/.deidstudy-vendored
echo "browser libraries: @niivue/niivue $version -> $dst"
