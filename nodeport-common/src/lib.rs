//! Types shared by the eBPF datapath and the userspace agent: every map key and value is
//! declared here exactly once, plus the pure helpers both sides must compute identically
//! (the flow hash that indexes Maglev tables, incremental checksum arithmetic).
//!
//! Conventions: addresses and ports are kept in network byte order, stored as the raw
//! integer read from packet memory (`u32::from_ne_bytes(octets)`); everything else is in
//! host order. All types are `#[repr(C)]` with explicit padding and size assertions.
#![no_std]

pub mod bench;
pub mod csum;
pub mod ct;
pub mod frag;
pub mod hash;
pub mod maps;
pub mod reject;
pub mod stats;

pub use maps::*;
pub use stats::Stat;
