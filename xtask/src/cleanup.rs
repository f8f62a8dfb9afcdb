//! `cargo xtask cleanup`: remove what earlier test, demo or benchmark runs left behind, namely
//! network namespaces named `np-*` and BPF pins under `/sys/fs/bpf/np-*`, and nothing else.
//!
//! Another test run may be going on at the same time on the same machine (its names are unique,
//! so it never collides with ours). The cleanup that `cargo xtask test` does before the
//! privileged tests therefore removes only entries older than any run can last; `cargo xtask
//! cleanup`, asked for by a person, removes them all.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::util;

/// Prefix of every name our tests create (see docs: test networks).
const PREFIX: &str = "np-";
const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns add` puts its names (iproute2's default NETNS_RUN_DIR).
const NETNS_RUN_DIR: &str = "/run/netns";

/// Longer than any test run may take (CI stops a job after 90 minutes).
pub const STALE_AFTER: Duration = Duration::from_secs(2 * 60 * 60);

#[derive(Clone, Copy)]
pub enum Scope {
    /// Every `np-*` namespace and pin.
    Everything,
    /// Only those created (or, for pin directories, last changed) longer than this ago; younger
    /// ones may belong to a run that is still going.
    OlderThan(Duration),
}

pub fn run(scope: Scope) -> Result<()> {
    let (namespaces, young_namespaces) = by_age(
        leftover_namespaces()?,
        |name| Path::new(NETNS_RUN_DIR).join(name),
        scope,
    );
    let (pins, young_pins) = by_age(leftover_pins()?, PathBuf::clone, scope);
    let young = young_namespaces.len() + young_pins.len();
    if young > 0 {
        eprintln!(
            "cleanup: left {young} recent np-* namespace(s)/pin(s) alone: they may belong to a \
             run still going (`cargo xtask cleanup` removes them)"
        );
    }
    if namespaces.is_empty() && pins.is_empty() {
        eprintln!("cleanup: nothing to remove");
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "cleanup needs root to remove {} namespace(s) and {} pin(s) left by earlier runs",
            namespaces.len(),
            pins.len()
        );
    }
    let ip = ip()?;
    for name in &namespaces {
        // Deleting the name does not stop processes still inside the namespace; say so, but
        // leave them alone (they are not ours to kill).
        let pids = util::run_captured(Command::new(&ip).args(["netns", "pids", name]))
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        if let Err(err) = util::run_quiet(Command::new(&ip).args(["netns", "delete", name])) {
            if Path::new(NETNS_RUN_DIR).join(name).exists() {
                return Err(err);
            }
            continue; // its owner deleted it in the meantime
        }
        if pids.is_empty() {
            eprintln!("cleanup: deleted network namespace {name}");
        } else {
            eprintln!("cleanup: deleted network namespace {name} (processes still inside: {pids})");
        }
    }
    for pin in &pins {
        let result = if pin.is_dir() && !pin.is_symlink() {
            fs::remove_dir_all(pin)
        } else {
            fs::remove_file(pin)
        };
        match result {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("removing {}", pin.display())),
        }
        eprintln!("cleanup: removed {}", pin.display());
    }
    Ok(())
}

/// Split `items` into (to remove, too young to remove) by the age of the file `path_of` names.
fn by_age<T>(items: Vec<T>, path_of: impl Fn(&T) -> PathBuf, scope: Scope) -> (Vec<T>, Vec<T>) {
    let Scope::OlderThan(min_age) = scope else {
        return (items, Vec::new());
    };
    let now = SystemTime::now();
    items.into_iter().partition(|item| {
        // The nsfs inode behind /run/netns/NAME carries the namespace's creation time. Unknown
        // ages count as young: when in doubt, leave it.
        fs::metadata(path_of(item))
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age >= min_age)
    })
}

fn ip() -> Result<PathBuf> {
    util::find_program("ip").context("`ip` not found: install iproute2 (cargo xtask setup)")
}

fn leftover_namespaces() -> Result<Vec<String>> {
    let Ok(ip) = ip() else {
        return Ok(Vec::new()); // no iproute2, so no namespaces of ours either
    };
    let output = util::run_quiet(Command::new(ip).args(["netns", "list"]))?;
    // Lines look like `np-abc123 (id: 3)` or just `np-abc123`.
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

fn leftover_pins() -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(BPFFS) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied && !util::is_root() => {
            eprintln!("cleanup: cannot read {BPFFS} without root; pins not checked");
            return Ok(Vec::new());
        }
        Err(err) => return Err(err).with_context(|| format!("reading {BPFFS}")),
    };
    let mut pins = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {BPFFS}"))?;
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            pins.push(Path::new(BPFFS).join(entry.file_name()));
        }
    }
    pins.sort();
    Ok(pins)
}

#[cfg(test)]
mod tests {
    use std::{env, fs::File};

    use super::*;

    #[test]
    fn only_old_entries_go_when_asked_for_stale_ones() {
        let dir = env::temp_dir().join(format!("xtask-age-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let old = dir.join("np-old");
        let new = dir.join("np-new");
        File::create(&old)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * STALE_AFTER)
            .unwrap();
        File::create(&new).unwrap();
        let items = vec![old.clone(), new.clone(), dir.join("np-gone")];

        let (remove, keep) = by_age(items.clone(), PathBuf::clone, Scope::OlderThan(STALE_AFTER));
        let (all, none) = by_age(items.clone(), PathBuf::clone, Scope::Everything);
        fs::remove_dir_all(&dir).unwrap();

        assert_eq!(remove, vec![old]);
        assert_eq!(keep, vec![new, dir.join("np-gone")]);
        assert_eq!(all, items);
        assert!(none.is_empty());
    }
}
