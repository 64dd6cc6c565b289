-- Whether the running VM's QEMU can pause its guest (`stop`/`cont`), as its monitor
-- listed its commands when the socket was given. A live deletion commits a disk's
-- active layer into its parent only then (the guest is paused around the pivot);
-- otherwise it streams. Null for stopped VMs and for VMs of earlier releases.
ALTER TABLE vms ADD COLUMN qemu_can_pause INTEGER;
