//! Black-box tests: the real service over HTTP, with bytes checked by qemu-io/qemu-img.

mod auth;
mod cancel_timing;
mod clones;
mod dashboard;
mod deploy;
mod durability;
mod events;
mod expiry;
mod full_disk;
mod guest_agent;
mod imports;
mod jobs;
mod live;
mod live_merge;
mod live_torture;
mod metrics;
mod openapi;
mod progress;
mod qmp;
mod quiesce;
mod read_model;
mod readme;
mod recovery;
mod runtime;
mod schedules;
mod snapshots;
mod stress;
#[path = "../support/mod.rs"]
mod support;
mod templates;
mod torture;
mod upgrade;
mod vms;
