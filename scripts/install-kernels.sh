#!/usr/bin/env bash
# The kernels the tests compare sandboxed kernels with, installed on the host from
# Debian (run as root): R with IRkernel, whose kernelspec `ir` lands in
# /usr/share/jupyter/kernels. The sandboxed R kernels run on an image of their own
# (tests/images_kit.py); this is only the local kernel they are measured against.
set -euo pipefail
source "$(dirname "$0")/debian-packages.sh"
install_packages install-kernels r-base-core r-cran-irkernel
