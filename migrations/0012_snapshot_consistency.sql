-- How consistent each snapshot's point in time is (issue 10): `stopped` (taken while
-- the VM was stopped; every snapshot of earlier releases), `crash` (a live snapshot
-- without a freeze) or `filesystem` (taken while the guest agent held the guest's
-- file systems frozen). A live job writes it once its switch is made.
ALTER TABLE snapshots ADD COLUMN consistency TEXT NOT NULL DEFAULT 'stopped';
