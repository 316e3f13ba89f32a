#!/usr/bin/env bash
# Install the Debian packages deidstudy needs, when they are missing.
# As root this runs apt-get; otherwise it prints what to install and continues
# (the parts of the test-suite that need a missing package then say so).
set -u
want=(libosmesa6 redis-server chromium chromium-driver postgresql)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm installs the browser libraries (scripts/vendor_js.sh); any Node.js ≥ 18 will do
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
# The virtual environment takes about 7.5 GB (PyTorch's wheel alone is 5.5 GB) and pip unpacks
# through a temporary folder: say so before pip fails half-way with "No space left on device".
free_kb=$(df -Pk . 2>/dev/null | awk 'NR==2 {print $4}')
if [ ! -x .venv/bin/python ] && [ -n "${free_kb:-}" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
  echo "WARNING: $((free_kb / 1024)) MB free here; installing deidstudy's .venv needs about 10 GB" >&2
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ]; then
  echo "Installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { echo "apt-get failed to install: ${missing[*]}" >&2; exit 1; }
else
  echo "NOTE: missing Debian packages: ${missing[*]}" >&2
  echo "      run as root: apt-get install ${missing[*]}" >&2
fi
