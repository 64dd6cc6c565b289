//! Black-box tests: the real service over HTTP, with bytes checked by qemu-io/qemu-img.

mod cancel_timing;
mod clones;
mod deploy;
mod documented;
mod durability;
mod expiry;
mod full_disk;
mod guest_agent;
mod helpers;
mod imports;
mod jobs;
mod live;
mod openapi;
mod qmp;
mod readme;
mod recovery;
mod runtime;
mod schedules;
mod snapshots;
mod stress;
mod templates;
mod torture;
mod upgrade;
mod vms;
