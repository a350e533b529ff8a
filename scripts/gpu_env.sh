# Sourced on the GPU machine from the repository root: makes `import unsloth_compile` load this
# tree with passes/ and kernels/ mapped as pyproject.toml maps them. The image's setuptools
# makes a path-only editable install (unsloth_compile.kernels not found), so the package is
# assembled in /tmp/uc_site instead; run Python with -P so that the repository root, which
# holds a bare unsloth_compile/ folder, is not put first on sys.path.
rm -rf /tmp/uc_site && mkdir -p /tmp/uc_site
cp -r unsloth_compile /tmp/uc_site/ && cp -r passes kernels /tmp/uc_site/unsloth_compile/
export PYTHONPATH=/tmp/uc_site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="python3 -P"
