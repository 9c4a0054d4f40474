#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs moejax (editable) with the `dev` extra (which
# takes in `train`, for train.py, eval.py and the benchmarks, and `notebooks`) and the TPU and GPU
# compilers (`tpu`: libtpu; `cuda-aot`: jax's CUDA plugin and ptxas), which the ahead-of-time
# compile tests in tests/aot need; no TPU or GPU does.
# Re-running it is cheap: the install is skipped while pyproject.toml is unchanged.
# Set MOEJAX_PYTHON=/path/to/python3.12 to choose the interpreter yourself.
set -euo pipefail
cd "$(dirname "$0")/.."

is_recent() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local candidate
  # 3.12 first: it is the version the project is developed and tested with.
  for candidate in "${MOEJAX_PYTHON:-}" python3.12 python3.13 python3 python; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && is_recent "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  # pyenv keeps other versions out of PATH; look at each installed one, 3.12 first.
  if command -v pyenv >/dev/null 2>&1; then
    local version
    for version in $(pyenv versions --bare 2>/dev/null | sort -rV | grep '^3\.12'; \
                     pyenv versions --bare 2>/dev/null | sort -rV | grep -v '^3\.12'); do
      candidate="$(pyenv root)/versions/$version/bin/python"
      if [ -x "$candidate" ] && is_recent "$candidate"; then
        echo "$candidate"
        return 0
      fi
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ] || ! is_recent .venv/bin/python; then
  if ! python=$(find_python); then
    cat >&2 <<'MSG'
moejax needs Python >= 3.12 (JAX >= 0.11 does), and none was found on PATH or in pyenv.
Install one, then run this script again, for example:
  pyenv install 3.12 && pyenv local 3.12        (with pyenv)
  uv python install 3.12 && export MOEJAX_PYTHON="$(uv python find 3.12)"   (with uv)
  sudo apt-get install python3.12 python3.12-venv   (Debian/Ubuntu releases that ship it)
or point MOEJAX_PYTHON at any Python >= 3.12.
MSG
    exit 1
  fi
  echo "setup: creating .venv with $python ($("$python" --version))" >&2
  rm -rf .venv
  "$python" -m venv .venv
fi

stamp=.venv/.moejax-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing moejax and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev,tpu,cuda-aot]"
  echo "$want" > "$stamp"
fi

# Fashion-MNIST (the pruning experiments and their tests) from the Debian package
# dataset-fashion-mnist: installed system-wide when running as root, otherwise unpacked without
# root into data/debian (gitignored), where moejax.data.fashion_mnist also looks.
fmnist_files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
has_fmnist() {
  local name
  for name in $fmnist_files; do [ -f "$1/$name" ] || return 1; done
}
fmnist_local=data/debian/usr/share/datasets/fashion-mnist
if ! has_fmnist "${MOEJAX_FASHION_MNIST_DIR:-/nonexistent}" \
    && ! has_fmnist /usr/share/datasets/fashion-mnist && ! has_fmnist "$fmnist_local"; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install dataset-fashion-mnist" >&2
    apt-get install -y -q dataset-fashion-mnist >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: unpacking dataset-fashion-mnist into data/debian (no root)" >&2
    deb_dir=$(mktemp -d)
    (cd "$deb_dir" && apt-get download dataset-fashion-mnist >/dev/null)
    mkdir -p data/debian
    dpkg -x "$deb_dir"/dataset-fashion-mnist_*.deb data/debian
    rm -rf "$deb_dir"
  fi
  has_fmnist /usr/share/datasets/fashion-mnist || has_fmnist "$fmnist_local" || {
    echo "setup: Fashion-MNIST is still missing; install dataset-fashion-mnist by hand" >&2
    exit 1
  }
fi

# The Hugging Face reference for the checkpoint-loading tests (tests/pretrained): torch and
# transformers in their own .venv-hf, run by the tests as a subprocess. It is Python 3.11 because
# that is what the CPU build of torch in /opt/wheels (pip's find-links here and in CI) is built
# for; PyPI's torch for 3.12 is a 5 GB CUDA build. Without it those tests skip, unless
# MOEJAX_REQUIRE_HF_REFERENCE=1 (as in CI). Set MOEJAX_HF_PYTHON to choose the interpreter.
hf_packages="torch==2.13.0 transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.3 numpy==2.4.6"

is_311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

find_python311() {
  local candidate version
  for candidate in "${MOEJAX_HF_PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && is_311 "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare 2>/dev/null | grep '^3\.11' | sort -rV); do
      candidate="$(pyenv root)/versions/$version/bin/python"
      if [ -x "$candidate" ] && is_311 "$candidate"; then
        echo "$candidate"
        return 0
      fi
    done
  fi
  return 1
}

# One line on why and how to fix it; fails setup only where the reference is required.
hf_reference_missing() {
  echo "setup: $1, so the Hugging Face reference tests (tests/pretrained) will be skipped; $2," \
    "then run this script again" >&2
  if [ "${MOEJAX_REQUIRE_HF_REFERENCE:-}" = 1 ]; then exit 1; fi
}

hf_stamp=.venv-hf/.moejax-installed
if [ "$(cat "$hf_stamp" 2>/dev/null)" != "$hf_packages" ]; then
  if ! is_311 .venv-hf/bin/python && hf_python=$(find_python311); then
    echo "setup: creating .venv-hf with $hf_python" >&2
    rm -rf .venv-hf
    "$hf_python" -m venv .venv-hf || true
  fi
  if ! is_311 .venv-hf/bin/python; then
    hf_reference_missing "no Python 3.11 able to make .venv-hf was found on PATH or in pyenv" \
      "install one (pyenv install 3.11) or set MOEJAX_HF_PYTHON to one"
  else
    echo "setup: installing torch (CPU) and transformers into .venv-hf" >&2
    hf_log=$(mktemp -t moejax-hf-pip.XXXXXX)
    # shellcheck disable=SC2086  # one argument per pin
    if .venv-hf/bin/python -m pip install --quiet $hf_packages >"$hf_log" 2>&1; then
      echo "$hf_packages" > "$hf_stamp"
      rm -f "$hf_log"
    else
      hf_reference_missing "pip could not install $hf_packages into .venv-hf (log: $hf_log)" \
        "fix what the log says (torch's CPU wheel for 3.11 comes from pip's find-links, /opt/wheels)"
    fi
  fi
fi
