//! The harness the black-box tests and the bench share: the real `strata` binary
//! spawned over a temporary data directory (`app`), an HTTP client (`client`) whose
//! every answer is checked against the OpenAPI document (`documented`), and qemu-io /
//! qemu-img on the files the service reports (`qemu`).
//!
//! Included by path (`#[path = ...] mod support;`) from tests/api/main.rs and
//! benches/strata.rs; each uses only part of it.
#![allow(dead_code)]

mod app;
mod client;
mod documented;
mod qemu;

pub use app::*;
pub use client::*;
pub use qemu::*;

pub const MIB: u64 = 1 << 20;
