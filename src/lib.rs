//! strata: a REST service that manages VM disks and their snapshot trees as qcow2
//! chains, running every file operation as a durable background job.

pub mod api;
pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod files;
pub mod jobs;
pub mod live;
pub mod metrics;
pub mod qemu;
pub mod scheduler;
pub mod store;
