# Sourced by the install scripts: install_packages LABEL PACKAGE...
# Installs those of PACKAGE... that dpkg does not list as installed, from Debian's archive
# (apt-get update only when one is missing), and says which it did.
install_packages() {
    local label=$1 pkg
    shift
    local missing=()
    for pkg in "$@"; do
        if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        printf '%s: installing Debian packages: %s\n' "$label" "${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        printf '%s: Debian packages: all %d present\n' "$label" "$#"
    fi
}
