#!/usr/bin/env bash
# Vendors the operator console's one third-party asset, htmx, from the npm registry into
# gateway/console/static/vendor/ (the console never loads anything from a CDN).
#   bash deploy/vendor-console-assets.sh
# The pinned version and the SHA-256 of its minified file make the copy reproducible; to
# upgrade, change both, run this, and commit what it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
HTMX_VERSION="2.0.11"
HTMX_SHA256="d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
target="gateway/console/static/vendor"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# npm checks the tarball against the registry's integrity hash as it downloads it.
(cd "$scratch" && npm pack --silent "htmx.org@${HTMX_VERSION}" >/dev/null)
tar -xzf "$scratch/htmx.org-${HTMX_VERSION}.tgz" -C "$scratch"
echo "${HTMX_SHA256}  $scratch/package/dist/htmx.min.js" | sha256sum --check --quiet
mkdir -p "$target"
cp "$scratch/package/dist/htmx.min.js" "$target/htmx.min.js"
cp "$scratch/package/LICENSE" "$target/htmx.LICENSE"
printf 'htmx.org %s (npm), htmx.min.js sha256 %s, license 0BSD (htmx.LICENSE)\n' \
  "$HTMX_VERSION" "$HTMX_SHA256" > "$target/VERSIONS"
echo "vendored htmx ${HTMX_VERSION} into ${target}"
