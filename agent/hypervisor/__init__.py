"""Who uses a base image: libvirt domains, instance disks, open files."""
