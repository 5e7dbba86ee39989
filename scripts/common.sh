# Shared defaults and the one set-up step every script uses. Sourced, not run.
# Override any default from the environment, e.g. LEGO_VENV=/opt/lego/venv.
: "${LEGO_ROOT:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${LEGO_VENV:=$LEGO_ROOT/.venv}"
: "${LEGO_PYTHON:=python3}"
# torch is installed first and pinned: an unpinned resolve pulls a multi-GB CUDA
# build. On machines without the local CPU wheel, set e.g.
# LEGO_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
: "${LEGO_TORCH_SPEC:=torch==2.13.0}"
: "${LEGO_EXTRAS:=dev}"
: "${LEGO_RUN_DIR:=$LEGO_ROOT/run}"
: "${LEGO_FRONTEND_PORT:=5555}"
: "${LEGO_BACKEND_PORT:=5556}"
: "${LEGO_BIND_HOST:=127.0.0.1}"
: "${LEGO_HEAD:=127.0.0.1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

# Create the virtualenv if missing and install the project (again only when
# setup.cfg or pyproject.toml changed since the last install).
lego_ensure_venv() {
  if [ ! -x "$LEGO_VENV/bin/python" ]; then
    echo "creating $LEGO_VENV" >&2
    "$LEGO_PYTHON" -m venv "$LEGO_VENV"
  fi
  local stamp="$LEGO_VENV/.lego-installed"
  local want
  want=$(cat "$LEGO_ROOT/setup.cfg" "$LEGO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing legodiffusion into $LEGO_VENV" >&2
    # shellcheck disable=SC2086  # the spec may carry pip options
    "$LEGO_VENV/bin/python" -m pip install -q --disable-pip-version-check $LEGO_TORCH_SPEC
    "$LEGO_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$LEGO_ROOT[$LEGO_EXTRAS]"
    echo "$want" > "$stamp"
  fi
}
