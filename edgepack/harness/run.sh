#!/bin/sh
# Run this bundle's harness: ./run.sh [bench.py flags], from any folder.
#
# Before hashing anything, every SHA256SUMS line is checked by name and file type: a name must be
# a relative path without `..`, a backslash or a carriage return, and must be a regular file
# reached through no symbolic link (a line naming /dev/zero, or a FIFO in the bundle, would make
# sha256sum read forever). Then GNU sha256sum checks the listed files when the device has it
# (busybox and macOS lack `-c --quiet`), and bench.py checks everything again and more: files not
# listed (bundle.sig is the one allowed extra), links anywhere, the manifest's paths, sha256 and
# size, the tokenizer, and with --public-key the signature bundle.sig. All flags go to bench.py.
# The caller's folder is exported so relative paths such as `--json out.json` or
# `--public-key signer.pub` land where the user expects.
set -eu

EDGEPACK_CALLER_CWD=$(pwd)
export EDGEPACK_CALLER_CWD
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
cd "$here"

refuse() {
    echo "run.sh: SHA256SUMS line $1: $2; re-copy the bundle" >&2
    exit 2
}

# One SHA256SUMS line: digest, two mode characters, a name inside the bundle naming a regular file.
check_line() {
    number=$1 line=$2
    h='[0-9a-fA-F]'
    h8="$h$h$h$h$h$h$h$h"
    case $line in
        *"$cr"*) refuse "$number" "holds a carriage return" ;;
        \\*) refuse "$number" "an escaped name (backslash or newline in it)" ;;
        $h8$h8$h8$h8$h8$h8$h8$h8"  "?*) name=${line#$h8$h8$h8$h8$h8$h8$h8$h8"  "} ;;
        $h8$h8$h8$h8$h8$h8$h8$h8" *"?*) name=${line#$h8$h8$h8$h8$h8$h8$h8$h8" *"} ;;
        *) refuse "$number" "malformed" ;;
    esac
    case $name in
        /* | .. | ../* | */../* | */.. | *\\*) refuse "$number" "$name is not a path inside the bundle" ;;
    esac
    part=$name
    while :; do
        if [ -L "$part" ]; then
            refuse "$number" "$part is a symbolic link; a bundle holds only regular files"
        fi
        case $part in */*) part=${part%/*} ;; *) break ;; esac
    done
    if [ -e "$name" ] && [ ! -f "$name" ]; then
        refuse "$number" "$name is not a regular file"
    fi
}

verify=1
for arg in "$@"; do
    [ "$arg" = "--no-verify" ] && verify=0
done

if [ "$verify" = 1 ] && [ -f SHA256SUMS ] && [ ! -L SHA256SUMS ]; then
    cr=$(printf '\r')
    number=0
    while IFS= read -r line || [ -n "$line" ]; do
        number=$((number + 1))
        [ -n "$line" ] && check_line "$number" "$line"
    done < SHA256SUMS
    if sha256sum --version 2>/dev/null | grep -q GNU \
        && ! sha256sum -c --quiet SHA256SUMS 1>&2; then
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
