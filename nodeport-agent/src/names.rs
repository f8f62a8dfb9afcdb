//! The names of the service ids, kept beside the pinned maps so that `inspect` (another
//! process, maybe with no agent running) can show `default/web:http/TCP` next to a
//! `svc_id`; the maps themselves hold only the numbers.
//!
//! The pin directory is on bpffs, which holds directories and symlinks but no regular files
//! (kernel/bpf/inode.c: `bpf_dir_iops` has `mkdir`, `symlink` and `rename` but no `create`,
//! so an `open(O_CREAT)` fails). Each name is therefore a symlink `<pin>/names/<svc_id>`
//! whose target is the name (a symlink's target is any string without NUL), written as
//! `<pin>/names/tmp-<svc_id>` and renamed over the old one, so a reader sees the old name
//! or the new one, never a partial one. (No dots in entry names: bpffs refuses them,
//! kernel/bpf/inode.c `bpf_lookup`, "reserved for future extensions".) The directory goes with the pin directory when the
//! agent exits (and stays with it under `--keep-datapath`, for the next agent to correct).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The directory under the pin path.
pub const DIR: &str = "names";

const TMP_PREFIX: &str = "tmp-";

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The names written under `<pin>/names/`, kept equal to what the agent serves.
#[derive(Debug)]
pub struct NameStore {
    dir: PathBuf,
    /// What the directory holds (as far as the writes succeeded).
    written: BTreeMap<u32, String>,
}

impl NameStore {
    /// Opens (creating it if needed) the names directory of `pin_dir`, taking what an
    /// earlier run left there as written; leftover temporary entries are removed.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let dir = pin_dir.join(DIR);
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let mut written = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.parse::<u32>() {
                Ok(id) => {
                    if let Ok(target) = fs::read_link(entry.path()) {
                        written.insert(id, target.to_string_lossy().into_owned());
                    }
                }
                Err(_) => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(Self { dir, written })
    }

    /// Brings the directory to `want` (svc_id -> name): writes the names that are new or
    /// changed and removes the others. Returns how many entries changed; on errors the
    /// rest is still written, and a later call retries what failed.
    pub fn sync(&mut self, want: &BTreeMap<u32, String>) -> std::result::Result<usize, Vec<Error>> {
        let mut errors = Vec::new();
        let mut changed = 0;
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let path = self.dir.join(id.to_string());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    errors.push(io_err(&path, e));
                    continue;
                }
            }
            self.written.remove(&id);
            changed += 1;
        }
        for (id, name) in want {
            if self.written.get(id) == Some(name) {
                continue;
            }
            let path = self.dir.join(id.to_string());
            let tmp = self.dir.join(format!("{TMP_PREFIX}{id}"));
            let _ = fs::remove_file(&tmp);
            let res = std::os::unix::fs::symlink(name, &tmp)
                .map_err(|e| io_err(&tmp, e))
                .and_then(|()| fs::rename(&tmp, &path).map_err(|e| io_err(&path, e)));
            match res {
                Ok(()) => {
                    self.written.insert(*id, name.clone());
                    changed += 1;
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(changed)
        } else {
            Err(errors)
        }
    }

    /// Whether the directory holds exactly `want`.
    pub fn is_current(&self, want: &BTreeMap<u32, String>) -> bool {
        &self.written == want
    }
}

/// The names under `pin_dir` (svc_id -> name); `None` when there is no names directory (an
/// agent from before the names were written, or no agent ever ran there).
pub fn read(pin_dir: &Path) -> Option<BTreeMap<u32, String>> {
    let dir = pin_dir.join(DIR);
    let entries = fs::read_dir(&dir).ok()?;
    let mut out = BTreeMap::new();
    for entry in entries.flatten() {
        let Ok(id) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue; // a temporary entry being renamed
        };
        if let Ok(target) = fs::read_link(entry.path()) {
            out.insert(id, target.to_string_lossy().into_owned());
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(pairs: &[(u32, &str)]) -> BTreeMap<u32, String> {
        pairs.iter().map(|(id, n)| (*id, n.to_string())).collect()
    }

    #[test]
    fn names_round_trip_through_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let pin = tmp.path();
        assert_eq!(read(pin), None, "no directory: no names (an older agent)");

        let mut store = NameStore::open(pin).unwrap();
        assert_eq!(read(pin), Some(BTreeMap::new()));
        let first = names(&[
            (1, "default/sample-nodeport/TCP"),
            (2, "default/sample-nodeport/UDP"),
            (7, "prod/web:https/TCP/IPv6"),
        ]);
        assert_eq!(store.sync(&first).unwrap(), 3);
        assert!(store.is_current(&first));
        assert_eq!(read(pin).as_ref(), Some(&first));
        // Nothing to do the second time.
        assert_eq!(store.sync(&first).unwrap(), 0);

        // A port goes, another takes a retired id's place, one is renamed.
        let second = names(&[
            (1, "default/sample-nodeport/TCP"),
            (2, "default/other/UDP"),
            (9, "kube-system/dns:dns-tcp/TCP"),
        ]);
        assert_eq!(store.sync(&second).unwrap(), 3);
        assert_eq!(read(pin).as_ref(), Some(&second));
        let left: Vec<String> = fs::read_dir(pin.join(DIR))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 3, "no temporary entries left: {left:?}");
    }

    #[test]
    fn a_restarted_agent_takes_over_what_is_there_and_corrects_it() {
        let tmp = tempfile::tempdir().unwrap();
        let pin = tmp.path();
        let mut old = NameStore::open(pin).unwrap();
        old.sync(&names(&[(1, "default/a/TCP"), (2, "default/b/TCP")]))
            .unwrap();
        // An interrupted write leaves a temporary entry; readers skip it.
        std::os::unix::fs::symlink("half", pin.join(DIR).join("tmp-3")).unwrap();
        assert_eq!(read(pin).unwrap().len(), 2);

        let mut new = NameStore::open(pin).unwrap();
        assert!(new.is_current(&names(&[(1, "default/a/TCP"), (2, "default/b/TCP")])));
        assert!(!pin.join(DIR).join("tmp-3").exists());
        // Only the difference is written.
        assert_eq!(new.sync(&names(&[(1, "default/a/TCP")])).unwrap(), 1);
        assert_eq!(read(pin), Some(names(&[(1, "default/a/TCP")])));
    }
}
