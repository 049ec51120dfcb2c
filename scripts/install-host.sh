#!/usr/bin/env bash
# Prepare a Debian 12 (bookworm) host for jupyter-sandbox. Run as root.
#
# Idempotent and fast when everything is already in place:
#   1. Debian packages the host side needs (apt-get update only if one is missing).
#   2. runsc (gVisor) with the systrap platform at /usr/local/bin/runsc.
#      bookworm's own runsc (0.0~20221219) only has the slow ptrace platform, so
#      we fetch trixie's runsc (one static binary, no dependencies) from Debian's
#      archive through a private apt configuration. The system's apt sources,
#      lists and package state are never touched.
set -euo pipefail

HOST_PACKAGES=(
    debootstrap     # builds the guest root filesystem
    e2fsprogs       # mkfs.ext4 -d: guest rootfs image for microVMs
    iproute2        # per-kernel network namespaces, veths, tc bandwidth caps (provisioner/network/)
    nftables        # per-kernel firewall for kernels that may use the network
    conntrack       # drops a removed kernel's flows: none reach the next on its addresses
    ca-certificates # TLS to the Debian archive and PyPI while building images
    python3-venv    # the project's own virtualenv
    util-linux      # nsenter (runsc inside a kernel's network namespace), mount, unshare
    procps          # sysctl inside network namespaces; ps / pkill used by diagnostics
    qemu-system-x86 # the microVM backend (QEMU -M microvm)
    busybox-static  # the microVM initramfs's shell and tools
    cpio            # packs the microVM initramfs
    kmod            # modprobe --show-depends / depmod for the guest kernel's modules
    binutils        # readelf: checks the guest kernel's PVH entry point
    patchelf        # relocates the agent's own Python into every image (provisioner/images/runtime.py)
    skopeo          # image build --from an OCI layout, archive or registry (provisioner/images/oci.py)
    docker-registry # the tests' loopback registry that images are pulled from (tests/oci_kit.py)
)
RUNSC=${RUNSC:-/usr/local/bin/runsc} # override only to test this script
RUNSC_MIN_DATE=20240729
CACHE=/var/cache/jupyter-sandbox/apt-trixie

log() { printf 'install-host: %s\n' "$*"; }
die() { printf 'install-host: error: %s\n' "$*" >&2; exit 1; }

[[ ${EUID} -eq 0 ]] || die "run as root"
[[ $(dpkg --print-architecture) == amd64 ]] || die "only amd64 hosts are supported"

# --- 1. host packages ---------------------------------------------------------
source "$(dirname "$0")/debian-packages.sh"
install_packages install-host "${HOST_PACKAGES[@]}"

# --- 2. runsc with systrap ----------------------------------------------------
# Prints the 8-digit date of a runsc binary's version ("0.0~20240729.0" from
# Debian, "release-20240729.0" from upstream), or nothing.
runsc_date() {
    "$1" --version 2>/dev/null | sed -n 's/^runsc version //p' | grep -o '[0-9]\{8\}' | head -n1 || true
}

current=$( [[ -x $RUNSC ]] && runsc_date "$RUNSC" || true )
if [[ -n $current && $current -ge $RUNSC_MIN_DATE ]]; then
    log "runsc: $RUNSC is version $current (>= $RUNSC_MIN_DATE), nothing to do"
else
    log "runsc: fetching Debian trixie's runsc into $CACHE"
    mkdir -p "$CACHE/lists/partial" "$CACHE/cache/archives/partial"
    echo "deb http://deb.debian.org/debian trixie main" >"$CACHE/sources.list"
    apt_private=(
        -o "Dir::Etc::sourcelist=$CACHE/sources.list"
        -o "Dir::Etc::sourceparts=/dev/null"
        -o "Dir::State::Lists=$CACHE/lists"
        -o "Dir::Cache=$CACHE/cache"
        -o "Acquire::Languages=none"
    )
    apt-get "${apt_private[@]}" -qq update
    work=$(mktemp -d "$CACHE/download.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    chown _apt:root "$work" # apt downloads as the unprivileged _apt user
    (cd "$work" && apt-get "${apt_private[@]}" -qq download runsc/trixie)
    deb=$(find "$work" -maxdepth 1 -name 'runsc_*.deb' | head -n1)
    [[ -n $deb ]] || die "apt-get download runsc/trixie produced no .deb"
    dpkg -x "$deb" "$work/x"
    [[ -x $work/x/usr/bin/runsc ]] || die "$(basename "$deb") has no usr/bin/runsc"
    new=$(runsc_date "$work/x/usr/bin/runsc")
    [[ -n $new && $new -ge $RUNSC_MIN_DATE ]] \
        || die "trixie's runsc reports version '${new:-unknown}', need >= $RUNSC_MIN_DATE"
    # Copy then rename so a running sandbox never sees a half-written binary.
    install -m 0755 "$work/x/usr/bin/runsc" "$RUNSC.new"
    mv -f "$RUNSC.new" "$RUNSC"
    log "runsc: installed $(basename "$deb") as $RUNSC (version $new)"
fi

log "done; next: jupyter sandbox image build && jupyter sandbox doctor"
