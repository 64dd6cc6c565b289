-- The consistency a schedule's snapshots ask for (issue 10): null leaves it to each
-- VM (`filesystem` when it has a guest-agent socket, else `crash`; `best_effort`).
ALTER TABLE schedules ADD COLUMN consistency TEXT;
ALTER TABLE schedules ADD COLUMN quiesce TEXT;
