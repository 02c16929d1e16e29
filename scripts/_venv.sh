# Sourced by scripts/serve and scripts/check: make .venv exist and hold the project.
# Installs on first use and again whenever pyproject.toml changes; otherwise costs nothing.

find_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: ackservice needs Python 3.11 or newer on PATH (or set PYTHON=/path/to/python)" >&2
    return 1
}

# ensure_venv EXTRA: EXTRA is "" for the server alone, "dev" for tests and linters too.
ensure_venv() {
    local extra=$1 spec=. stamp
    [ -n "$extra" ] && spec=".[$extra]"
    stamp=".venv/.installed-${extra:-runtime}"
    local want
    want=$(cksum pyproject.toml | cut -d' ' -f1)
    if [ ! -x .venv/bin/python ]; then
        local python
        python=$(find_python) || return 1
        echo "setting up .venv with $("$python" --version) (first run only)..." >&2
        "$python" -m venv .venv || return 1
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing ackservice${extra:+ with $extra tools} into .venv..." >&2
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec" || {
            echo "error: installing into .venv failed (see above); is the package index reachable?" >&2
            return 1
        }
        echo "$want" >"$stamp"
    fi
}
