#!/bin/sh
# Run this bundle's latency harness: ./run.sh [bench.py flags], from any folder.
#
# Checks the files SHA256SUMS lists with GNU sha256sum when it is there (busybox and macOS lack
# `-c --quiet`), then hands over to bench.py, which checks everything again and more: files not
# listed (sha256sum -c only reads the listed ones; bundle.sig is the one allowed extra), symbolic
# links, the manifest's paths, sha256 and size, and with --public-key the signature bundle.sig.
# All flags go to bench.py. The caller's folder is exported so relative paths such as
# `--json out.json` or `--public-key signer.pub` land where the user expects.
set -eu

EDGEPACK_CALLER_CWD=$(pwd)
export EDGEPACK_CALLER_CWD
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
cd "$here"

verify=1
for arg in "$@"; do
    [ "$arg" = "--no-verify" ] && verify=0
done

if [ "$verify" = 1 ] && [ -f SHA256SUMS ] \
    && sha256sum --version 2>/dev/null | grep -q GNU; then
    if ! sha256sum -c --quiet SHA256SUMS 1>&2; then
        echo "run.sh: files differ from SHA256SUMS (listed above); re-copy the bundle" >&2
        exit 2
    fi
fi

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "run.sh: $PYTHON not found; install Python 3.8+ and run: $PYTHON -m pip install -r requirements.txt" >&2
    exit 2
fi
exec "$PYTHON" bench.py "$@"
