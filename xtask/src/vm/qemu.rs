//! Boots a kernel with an initramfs under qemu (software emulation: these machines have no
//! KVM), serial console on stdout, and collects the console until the VM powers off or the
//! time limit passes. The qemu process never outlives the [`Boot`] that started it.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// The line `/init` prints first, once the kernel has started it.
pub const INIT_MARKER: &str = "NP-VM-INIT";

/// What a boot left: the console, and how long things took.
pub struct Console {
    pub lines: Vec<String>,
    /// From qemu's start to the init marker on the console (None: init never ran).
    pub boot: Option<Duration>,
    pub total: Duration,
    /// The time limit passed and qemu was killed.
    pub timed_out: bool,
    /// qemu's exit status, when it exited by itself.
    pub exit: Option<std::process::ExitStatus>,
}

/// A running qemu, killed and reaped when dropped (also when a panic unwinds).
struct Boot(Child);

impl Drop for Boot {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Boots `vmlinuz` with `initrd`, copies the console to `log` as it arrives (and to our
/// stderr when `echo`), and returns when qemu exits or after `limit`.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    limit: Duration,
    echo: bool,
) -> Result<Console> {
    let qemu = crate::util::find_program("qemu-system-x86_64")
        .context("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")?;
    let mut cmd = Command::new(qemu);
    cmd.args(["-nographic", "-monitor", "none", "-no-reboot"])
        .args(["-m", "2048", "-smp", "1"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 loglevel=4 net.ifnames=0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut boot = Boot(
        cmd.spawn()
            .with_context(|| format!("starting `{}`", crate::util::describe(&cmd)))?,
    );
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        boot.0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        boot.0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut console = Console {
        lines: Vec::new(),
        boot: None,
        total: Duration::ZERO,
        timed_out: false,
        exit: None,
    };
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            console.timed_out = true;
            break;
        }
        match rx.recv_timeout(left) {
            Ok(line) => {
                if console.boot.is_none() && line.starts_with(INIT_MARKER) {
                    console.boot = Some(start.elapsed());
                }
                writeln!(file, "{line}")?;
                if echo {
                    eprintln!("    | {line}");
                }
                console.lines.push(line);
            }
            // Both streams closed: qemu has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                console.timed_out = true;
                break;
            }
        }
    }
    if !console.timed_out {
        console.exit = boot.0.wait().ok();
    }
    drop(boot);
    console.total = start.elapsed();
    Ok(console)
}
