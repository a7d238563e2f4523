#!/usr/bin/env bash
# Installs the default text corpus of effitrans.data (text_lm, text_retrieval):
# the reStructuredText sources of the CPython 3.11 docs (Debian/Ubuntu package
# python3.11-doc), and prints where they are, how many files and bytes.
# Without it the pipelines fall back to the built-in pydoc_data.topics text.
set -euo pipefail

PKG="${PKG:-python3.11-doc}"
DIR="${CORPUS_DIR:-/usr/share/doc/python3.11/html/_sources}"

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

if [ ! -d "$DIR" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install $PKG by hand, or rely on the pydoc_data.topics fallback" >&2
    exit 1
  fi
  $SUDO apt-get install -y "$PKG" || { $SUDO apt-get update && $SUDO apt-get install -y "$PKG"; }
fi

if [ ! -d "$DIR" ]; then
  echo "expected $DIR after installing $PKG; files of the package:" >&2
  dpkg -L "$PKG" | grep '\.rst\.txt$' | head -5 >&2 || true
  exit 1
fi

NFILES=$(find "$DIR" -name '*.rst.txt' | wc -l)
NBYTES=$(find "$DIR" -name '*.rst.txt' -print0 | xargs -0 cat | wc -c)
echo "corpus: $DIR ($NFILES .rst.txt files, $NBYTES bytes)"
if [ -n "${PYTHON:-}" ] || command -v python >/dev/null 2>&1; then
  "${PYTHON:-python}" -c "from effitrans.data import load_corpus; c = load_corpus('$DIR'); print('sha256 (effitrans definition):', c.sha256)" 2>/dev/null || true
fi
