//! The harness the black-box tests and the bench share: the real `strata` binary
//! spawned over a temporary data directory (`app`); a typed client that reads answers
//! as strata's own view types (`client`, `views`) over untyped requests for exact
//! shapes and bad input (`http`), every answer checked against the OpenAPI document
//! (`documented`); qemu-io / qemu-img on the files the service reports (`qemu`); a
//! running VM stood in for by qemu-storage-daemon (`live`), and its guest agent by a
//! double (`guest_agent`).
//!
//! Included by path (`#[path = ...] mod support;`) from tests/api/main.rs and
//! benches/strata.rs; each uses only part of it.
#![allow(dead_code)]

mod app;
mod client;
mod documented;
mod events;
pub mod guest_agent;
mod http;
pub mod live;
mod qemu;
mod views;

pub use app::*;
pub use client::*;
pub use events::*;
pub use http::*;
pub use qemu::*;
pub use views::*;

pub const MIB: u64 = 1 << 20;
