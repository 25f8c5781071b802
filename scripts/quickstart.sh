#!/usr/bin/env bash
# The main job on the embedded default (local catalog, local volumes, no
# external service): make a small disk image, import it into the local
# catalog (once plain, once volume-backed), prepare base images with both
# handlers, create a volume from the image, and show the result.
# Runs again without harm; `bash scripts/quickstart.sh clean` undoes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

STATE=${QUICKSTART_DIR:-$PWD/quickstart-state}
CONF=$STATE/template-agent.conf
agent() { .venv/bin/template-agent --config-file "$CONF" "$@"; }
step() { printf '\n$ template-agent %s\n' "$*"; agent "$@"; }

if [ "${1:-}" = clean ]; then
    if [ -f "$CONF" ]; then
        agent prune --min-age 0 --yes >/dev/null || true
        for id in $(agent cache list --format json | .venv/bin/python -c \
                'import json,sys; print(" ".join(e["image_id"] for e in json.load(sys.stdin)))'); do
            agent cache evict "$id" >/dev/null || true
        done
        for vol in $(agent volume list --format json | .venv/bin/python -c \
                'import json,sys; print(" ".join(v["id"] for v in json.load(sys.stdin)))'); do
            agent volume delete "$vol" >/dev/null 2>&1 || true
        done
    fi
    for dev in $(losetup -n -O NAME,BACK-FILE -l | awk -v s="$STATE" 'index($2, s) == 1 {print $1}'); do
        losetup -d "$dev"
    done
    rm -rf "$STATE"
    echo "quickstart: cleaned $STATE"
    exit 0
fi

mkdir -p "$STATE" "$STATE/instances"  # nova makes instances_path; here, we do
cat > "$CONF" <<CONF
[DEFAULT]
instances_path = $STATE/instances
state_path = $STATE/agent
# link when the image is (or can be put) in a volume, download otherwise
template_image_handler = volume_linking,downloading
[image_cache]
remove_unused_original_minimum_age_seconds = 3600
[libvirt]
# no libvirtd needed for the quickstart; use qemu:///system on a hypervisor
connection_uri =
[api]
socket_path = $STATE/agent.sock
CONF

# a small disk: an MBR partition table, some data, mostly zeros
RAW=$STATE/demo.raw
if [ ! -f "$STATE/demo.qcow2" ]; then
    truncate -s 64M "$RAW"
    printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$RAW" >/dev/null
    seq 1 1500000 | dd of="$RAW" bs=1M seek=1 conv=notrunc status=none
    qemu-img convert -f raw -O qcow2 "$RAW" "$STATE/demo.qcow2"
fi

catalog=$(agent images list --format json)
if ! grep -q '"id": "demo"' <<<"$catalog"; then
    step images import "$STATE/demo.qcow2" --id demo --name "demo (qcow2)"
fi
if ! grep -q '"id": "demo-volume"' <<<"$catalog"; then
    step images import "$RAW" --id demo-volume --name "demo (volume-backed)" --volume-backed
fi
step images list
step fetch demo --handler downloading
step fetch demo-volume --handler volume_linking
step volume create --image demo --size 1
step list
step cache list
step volume list
step status
