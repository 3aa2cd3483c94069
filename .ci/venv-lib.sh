# Sourced by the .ci/*-env.sh scripts. remove_venv DIR: delete DIR only if it is absent or a Python
# venv (has pyvenv.cfg): a cache path pointed at someone's own directory is never wiped.
remove_venv() {
  if [ -e "$1" ] && [ ! -f "$1/pyvenv.cfg" ]; then
    echo "refusing to remove $1: it is not a venv (set the cache variable to another directory)" >&2
    exit 1
  fi
  rm -rf "$1"
}
