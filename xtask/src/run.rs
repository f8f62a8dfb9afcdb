//! `cargo xtask run`: the namespace demo (np-demo), or with arguments the agent itself.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{build, setup, util};

pub fn run(agent_args: Vec<OsString>) -> Result<ExitCode> {
    if !util::is_root() {
        bail!(
            "`cargo xtask run` must run as root: the agent loads eBPF programs{}; \
             run it from a root shell with rustup on PATH",
            if agent_args.is_empty() {
                " and the demo creates network namespaces"
            } else {
                ""
            }
        );
    }
    setup::ensure(setup::Scope::All)?;
    let bin = build::cargo_build(true)?;
    let agent = bin.join("nodeport-agent");
    require_binary(&agent)?;

    if !agent_args.is_empty() {
        // Real node mode: become the agent, so signals and the exit status are its own.
        let err = Command::new(&agent).args(&agent_args).exec();
        return Err(err).with_context(|| format!("failed to run {}", agent.display()));
    }

    let demo = bin.join("np-demo");
    let echo = bin.join("np-echo");
    require_binary(&demo)?;
    require_binary(&echo)?;
    let mut cmd = Command::new(&demo);
    cmd.arg("--agent").arg(&agent).arg("--echo").arg(&echo);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{}`", util::describe(&cmd)))?;
    // Ctrl-C goes to np-demo too (same foreground process group); it cleans up and exits, and
    // we stay around to report its status.
    util::shield_signals_for_child(child.id());
    let status = child.wait().context("waiting for np-demo")?;
    util::forget_child();
    Ok(ExitCode::from(util::exit_code_of(status)))
}

fn require_binary(path: &Path) -> Result<()> {
    ensure!(
        path.exists(),
        "{} was not built (is its [[bin]] declared?)",
        path.display()
    );
    Ok(())
}
