#!/bin/sh
# Build one image per implemented service: every `FROM runtime AS <service>`
# target of deploy/Dockerfile, tagged llmo/<service>:<tag>. Run from anywhere;
# the build context is the repository root.
#
#   deploy/build-images.sh [TAG] [docker build options...]     # TAG defaults to 0.1.0
#   DOCKER="echo docker" deploy/build-images.sh dev             # print the commands only
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
tag=${1:-0.1.0}
[ $# -gt 0 ] && shift
services=$(sed -n 's/^FROM runtime AS \([a-z][a-z0-9_-]*\)$/\1/p' "$here/Dockerfile")
[ -n "$services" ] || { echo "no service targets in $here/Dockerfile" >&2; exit 1; }
for svc in $services; do
  ${DOCKER:-docker} build -f "$here/Dockerfile" --target "$svc" -t "llmo/$svc:$tag" "$@" "$root"
done
