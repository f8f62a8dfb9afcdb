//! `cargo xtask build`: the agent (whose build script compiles the eBPF object with nightly
//! through aya-build and embeds it) and the test binaries (np-demo, np-echo, ...).

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{setup, util};

/// Set up the toolchain and build; returns the profile's output directory.
pub fn run(release: bool) -> Result<PathBuf> {
    setup::ensure(setup::Scope::Toolchain)?;
    cargo_build(release)
}

/// Just the cargo build (the caller has run setup).
pub fn cargo_build(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(util::workspace_root()).arg("build");
    if release {
        cmd.arg("--release");
    }
    cmd.args(["-p", "nodeport-agent", "-p", "tests", "--bins"]);
    util::run_inherit(&mut cmd)?;
    Ok(profile_dir(release))
}

pub fn profile_dir(release: bool) -> PathBuf {
    util::target_dir().join(if release { "release" } else { "debug" })
}
