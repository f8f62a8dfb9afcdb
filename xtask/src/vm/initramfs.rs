//! The VM's root filesystem: an uncompressed `newc` cpio archive (the kernel unpacks it into
//! its rootfs) with busybox, the kernel's modules, host binaries with their shared libraries
//! (at the paths `ldd` names, so that the host's dynamic loader finds them) and `/init`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util;

enum Entry {
    Dir,
    File { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// Files to pack, by their absolute path inside the VM.
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// Adds `entry` at `path`, and the folders above it (a prefix sorts first, so every
    /// folder precedes its contents in the archive).
    fn add(&mut self, path: &str, entry: Entry) {
        for dir in Path::new(path).ancestors().skip(1) {
            let dir = dir.to_string_lossy();
            if dir != "/" && !dir.is_empty() {
                self.entries.entry(dir.into_owned()).or_insert(Entry::Dir);
            }
        }
        self.entries.insert(path.to_owned(), entry);
    }

    pub fn dir(&mut self, path: &str) {
        self.add(path, Entry::Dir);
    }

    /// A copy of the host file `source` at `path`, executable or not.
    pub fn file(&mut self, path: &str, source: &Path, executable: bool) {
        let mode = if executable { 0o755 } else { 0o644 };
        self.add(
            path,
            Entry::File {
                source: source.to_owned(),
                mode,
            },
        );
    }

    pub fn bytes(&mut self, path: &str, data: Vec<u8>, executable: bool) {
        let mode = if executable { 0o755 } else { 0o644 };
        self.add(path, Entry::Bytes { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Entry::Symlink(target.to_owned()));
    }

    /// A host executable at `path` and every shared library it needs, at the host's paths.
    pub fn binary(&mut self, path: &str, source: &Path) -> Result<()> {
        self.file(path, source, true);
        for lib in shared_libraries(source)? {
            let canonical = fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone());
            self.file(&lib.to_string_lossy(), &canonical, true);
        }
        Ok(())
    }

    /// A host executable at its own path (e.g. `/usr/sbin/ip`), with its libraries.
    pub fn host_program(&mut self, name: &str) -> Result<()> {
        let path = util::find_program(name)
            .with_context(|| format!("`{name}` is not installed on this machine"))?;
        self.binary(&path.to_string_lossy(), &path)
    }

    /// Writes the archive to `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = BufWriter::new(file);
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path.trim_start_matches('/');
            let (mode, data) = match entry {
                Entry::Dir => (0o040_755, Vec::new()),
                Entry::File { source, mode } => (
                    0o100_000 | mode,
                    fs::read(source).with_context(|| format!("reading {}", source.display()))?,
                ),
                Entry::Bytes { data, mode } => (0o100_000 | mode, data.clone()),
                Entry::Symlink(target) => (0o120_777, target.as_bytes().to_vec()),
            };
            write_header(&mut w, ino + 1, mode, data.len(), name)?;
            w.write_all(&data)?;
            pad4(&mut w, data.len())?;
        }
        write_header(&mut w, 0, 0, 0, "TRAILER!!!")?;
        w.flush()?;
        Ok(())
    }
}

/// One `newc` header and the entry's name, padded to four bytes.
fn write_header(
    w: &mut impl std::io::Write,
    ino: usize,
    mode: u32,
    size: usize,
    name: &str,
) -> Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize (with its NUL), check.
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + name.len() + 1)
}

fn pad4(w: &mut impl std::io::Write, len: usize) -> Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])?;
    Ok(())
}

/// The shared libraries `ldd` lists for `binary` (with the dynamic loader); none for a
/// static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = util::run_captured(Command::new("ldd").arg(binary))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || out.stderr.starts_with(b"\tnot a dynamic") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux... (0x...)`
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line.trim(),
        };
        let path = path.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {}", binary.display(), line.trim());
        }
    }
    Ok(libs)
}
