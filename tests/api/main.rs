//! Black-box tests: the real service over HTTP, with bytes checked by qemu-io/qemu-img.

mod helpers;
mod openapi;
mod recovery;
mod snapshots;
