-- Labels on VMs: a JSON object of string keys to string values, used to select VMs
-- (GET /v1/vms?label=k=v, and schedules with a label selector).
ALTER TABLE vms ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
