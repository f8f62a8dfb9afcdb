//! `cargo xtask bench`: benchmarks (tracked in issue 5).
//!
//! The intended shape, for whoever picks it up: `setup::ensure(Scope::All)`, `cleanup::run(Scope::OlderThan(STALE_AFTER))`,
//! `build::cargo_build(true)`, then run the benchmark binary of the tests crate as root (all
//! traffic inside `np-*` namespaces, bounded in count and time), and print its report. Until
//! then this fails honestly instead of pretending to measure anything.

use anyhow::{bail, Result};

pub fn run() -> Result<()> {
    bail!("not implemented yet: tracked in issue 5")
}
