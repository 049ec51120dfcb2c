#!/usr/bin/env bash
# A single-host JupyterHub whose users' kernels run in sandboxes (The Littlest
# JupyterHub's way: local users, systemd). Run as root on Debian 12; idempotent.
#
#   bash deploy/install-hub.sh           the software, in /opt/jupyter-sandbox:
#                                        host packages, runsc, QEMU, the guest image,
#                                        a venv (Debian's Python, readable by every user)
#                                        with JupyterHub, JupyterLab and this project,
#                                        configurable-http-proxy from npm
#   bash deploy/install-hub.sh --system  and the configuration (kept if present):
#                                        /etc/jupyter-sandbox/policy.toml,
#                                        /etc/jupyterhub/jupyterhub_config.py, the group
#                                        jupyterhub-users, both systemd units, started
set -euo pipefail

PREFIX=/opt/jupyter-sandbox
REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'install-hub: %s\n' "$*"; }
[[ ${EUID} -eq 0 ]] || { echo "install-hub: run as root" >&2; exit 1; }

bash "$REPO/scripts/install-host.sh"
if ! command -v npm >/dev/null; then
    log "installing Debian packages: nodejs npm"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# Debian's own Python: a pyenv or /root one would not be readable by the users.
if [[ ! -x $PREFIX/venv/bin/python ]]; then
    log "creating $PREFIX/venv"
    mkdir -p "$PREFIX"
    /usr/bin/python3 -m venv "$PREFIX/venv"
fi
stamp=$PREFIX/venv/.jupyter-sandbox-source
source_id=$(cd "$REPO" && find pyproject.toml provisioner guest kernelspecs -type f \
    ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$source_id" ]]; then
    log "installing JupyterHub, JupyterLab and jupyter-sandbox into $PREFIX/venv"
    "$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
    "$PREFIX/venv/bin/python" -m pip install -q "jupyterhub>=5.5.4,<6" "jupyterlab>=4"
    # a copy of the tree, so that pip leaves no build folders in the repository
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/provisioner" "$REPO/guest" "$build/"
    "$PREFIX/venv/bin/python" -m pip install -q "$build[lab]" # [lab]: JupyterLab's widget manager too
    # this host's backends only: python3-kubernetes is for a cluster's servers (deploy/kubernetes)
    for spec in python3-gvisor python3-microvm; do
        "$PREFIX/venv/bin/jupyter" kernelspec install "$REPO/kernelspecs/$spec" --sys-prefix \
            --replace >/dev/null
    done
    echo "$source_id" >"$stamp"
fi
if [[ ! -x $PREFIX/proxy/node_modules/.bin/configurable-http-proxy ]]; then
    log "installing configurable-http-proxy from npm into $PREFIX/proxy"
    npm install --silent --no-audit --no-fund --prefix "$PREFIX/proxy" configurable-http-proxy@4
fi
"$PREFIX/venv/bin/jupyter-sandbox" image build
chmod -R a+rX "$PREFIX"

[[ ${1:-} == --system ]] || exit 0

install -d -m 0755 /etc/jupyter-sandbox /etc/jupyterhub
install -d -m 0700 /var/lib/jupyterhub
[[ -f /etc/jupyter-sandbox/policy.toml ]] || install -m 0644 "$REPO/deploy/policy.toml" /etc/jupyter-sandbox/
[[ -f /etc/jupyterhub/jupyterhub_config.py ]] \
    || install -m 0644 "$REPO/deploy/jupyterhub_config.py" /etc/jupyterhub/
getent group jupyterhub-users >/dev/null || groupadd --system jupyterhub-users
install -d -m 0755 /etc/systemd/system
install -m 0644 "$REPO/deploy/jupyter-sandbox.service" "$REPO/deploy/jupyterhub.service" \
    /etc/systemd/system/
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable --now jupyter-sandbox.service jupyterhub.service
    log "JupyterHub runs on port 8000; add users with: useradd -m -G jupyterhub-users NAME && passwd NAME"
else
    log "no systemd here: start the two services by hand (docs/hubs.md, the deployment guide)"
fi
