"""template-image-agent: prepares hypervisor base images."""
