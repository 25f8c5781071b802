#!/usr/bin/env bash
# The main job on the embedded default (local catalog, no external service):
# make a small disk image, import it into the local catalog, prepare its
# base image, and show the result. Runs again without harm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

STATE=${QUICKSTART_DIR:-$PWD/quickstart-state}
mkdir -p "$STATE"
CONF=$STATE/template-agent.conf
cat > "$CONF" <<CONF
[DEFAULT]
instances_path = $STATE/instances
state_path = $STATE/agent
template_image_handler = downloading
[libvirt]
# no libvirtd needed for the quickstart; set qemu:///system on a hypervisor
connection_uri =
CONF
agent() { .venv/bin/template-agent --config-file "$CONF" "$@"; }

# a small disk: a partition table, some data, mostly zeros, as qcow2
RAW=$STATE/demo.raw
rm -f "$RAW"
truncate -s 64M "$RAW"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$RAW" >/dev/null
dd if=/dev/urandom of="$RAW" bs=1M seek=1 count=8 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$RAW" "$STATE/demo.qcow2"

agent images import "$STATE/demo.qcow2" --id demo-image --name demo
agent images list
agent fetch demo-image
agent list
agent prune --dry-run --min-age 0
