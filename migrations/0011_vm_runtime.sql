-- How strata reaches a running VM's QEMU (issue 10): the monitor and guest-agent
-- sockets the orchestrator gave when it marked the VM running, and the QEMU version
-- the monitor reported. All null for a stopped VM and for VMs of earlier releases.
ALTER TABLE vms ADD COLUMN qmp_socket TEXT;
ALTER TABLE vms ADD COLUMN guest_agent_socket TEXT;
ALTER TABLE vms ADD COLUMN qemu_version TEXT;
