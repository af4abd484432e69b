# Sourced by the scripts in .ci/.

# pip, quiet, without the one warning line per package that this machine's
# pip configuration prints for an absent local index; pip's exit status is
# kept (pipefail).  The filter is plain bash, so it works on any PATH.
pip_quiet() {
    python -m pip --quiet "$@" 2>&1 | while IFS= read -r line; do
        case $line in
            "WARNING: Location '"*"' is ignored"*) ;;
            *) printf '%s\n' "$line" ;;
        esac
    done
}

# A fresh virtual environment at $2 made by interpreter $1, activated, with
# an up-to-date pip.
fresh_venv() {
    "$1" -m venv "$2"
    . "$2/bin/activate"
    pip_quiet install --upgrade pip
}
