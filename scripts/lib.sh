# Shared by the scripts in this folder (source it).

# apt_install_missing TAG PACKAGE...: install the Debian packages that are
# not installed yet (as root), quietly; TAG prefixes the one line it prints.
apt_install_missing() {
    local tag=$1 p
    shift
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "$tag: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# venv_pip_install TAG VENV PYTHON CONSTRAINTS REQUIREMENT...: make VENV
# with PYTHON if it has none, then pip install the requirements pinned by
# the constraints file (every dependency, a set checked to work together).
# Prints the tail of pip's log and fails if pip does.
venv_pip_install() {
    local tag=$1 venv=$2 python=$3 constraints=$4
    shift 4
    if [ ! -x "$venv/bin/python" ]; then
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv"
    fi
    local log="$venv/pip-install.log"
    echo "$tag: pip install $* into $venv (about a minute)"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check \
            -c "$constraints" "$@" > "$log" 2>&1; then
        grep -v 'is ignored: it is neither a file nor a directory' "$log" \
            | tail -40
        echo "$tag: pip install failed (full log: $log)" >&2
        return 1
    fi
}
