# Shared by scripts/serve and scripts/test: system packages and the virtualenv.
# Sourced, not run. Works as root or through sudo on a fresh Debian/Ubuntu machine.

_sudo() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

_apt_updated=""
apt_install() {  # apt_install PACKAGE... — installs only what is missing
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null; then
        echo "error: need ${missing[*]} and there is no apt-get; install them by hand" >&2
        return 1
    fi
    if [ -z "$_apt_updated" ]; then _sudo apt-get update -qq; _apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive _sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_venv() {  # ensure_venv — .venv (its pip comes from the lock, in install_locked)
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: notifier needs Python >= 3.11 ($py is $("$py" --version 2>&1))" >&2
        return 1
    fi
    if [ ! -x .venv/bin/python ]; then
        # Debian splits venv/ensurepip into python3-venv
        "$py" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
        "$py" -m venv .venv
    fi
}

install_locked() {  # install_locked LOCK [pip args for the project] — the lock's exact versions
    # Every file is checked against the lock's sha256; a dependency missing from the lock is
    # an error, not a download. The project goes in last without its dependencies, built by
    # the locked hatchling (no isolated build environment fetching the newest one).
    .venv/bin/python -m pip install -q --require-hashes -r "$1"
    shift
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation "$@"
    # An editable install leaves the project's own modules uncompiled, and a machine with
    # PYTHONDONTWRITEBYTECODE never caches them: every process start would compile them
    # again (~0.1 s of a worker's cold start). Compiled once here; edits recompile as usual.
    .venv/bin/python -m compileall -q notifier >/dev/null
}
