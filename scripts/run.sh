#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job on the embedded default:
# a local docker-registry holding a real image layer, and `damselfly up` (scheduler + seed +
# PEERS dfdaemons on loopback) pulling that layer through every dfdaemon at once. Prints who
# got which bytes from where. Data and logs stay under $WORK (printed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PEERS=${PEERS:-3}
WORK=${WORK:-$(mktemp -d /tmp/damselfly-run-XXXXXX)}
mkdir -p "$WORK/registry"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/registry/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $WORK/registry/data
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$WORK/registry/config.yml" > "$WORK/registry/registry.log" 2>&1 &
registry_pid=$!
trap 'kill $registry_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

# A real layer: this project's installed dependencies, as a gzip'd tar.
layer="$WORK/layer.tar.gz"
tar -czf "$layer" -C .venv/lib "$(ls .venv/lib)"
digest="sha256:$(sha256sum "$layer" | cut -d' ' -f1)"
location=$(curl -fsS -X POST -D - -o /dev/null "http://127.0.0.1:$port/v2/demo/layer/blobs/uploads/" \
  | tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
case $location in http*) ;; *) location="http://127.0.0.1:$port$location" ;; esac
sep='?'; [[ $location == *\?* ]] && sep='&'
curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$layer" \
  "${location}${sep}digest=$digest" >/dev/null
echo "registry 127.0.0.1:$port holds demo/layer $digest ($(du -h "$layer" | cut -f1))"

.venv/bin/damselfly up --peers "$PEERS" --data-dir "$WORK/cluster" \
  --fetch "http://127.0.0.1:$port/v2/demo/layer/blobs/$digest"
