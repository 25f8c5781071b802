#!/usr/bin/env bash
# Install a real libvirtd + QEMU (x86, TCG and KVM) on Debian 12, as root,
# for the real-peer tests (tests/test_libvirtd_real.py). Safe to run again:
# installs only what is missing and starts nothing (the tests' fixture starts
# virtlogd and libvirtd itself, without systemd).
set -euo pipefail

source "$(dirname "$0")/lib.sh"
# no systemd on test machines: keep maintainer scripts from starting services
# (policy-rc.d 101 = "action forbidden") while installing, then restore
policy=/usr/sbin/policy-rc.d
created_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    created_policy=1
fi
trap 'if [ -n "$created_policy" ]; then rm -f "$policy"; fi' EXIT
apt_install_missing install-libvirtd libvirt-daemon-system \
    libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils

for tool in libvirtd virtlogd qemu-system-x86_64 qemu-img virsh; do
    command -v "$tool" >/dev/null || {
        echo "install-libvirtd: $tool is missing after install" >&2; exit 1; }
done

# KVM when the machine has it: the kvm group must be able to open /dev/kvm,
# else QEMU is denied KVM and libvirt re-probes capabilities on every start
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
fi
echo "install-libvirtd: ready ($(libvirtd --version | head -1))"
