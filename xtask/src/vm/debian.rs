//! Debian packages for the VMs, fetched with a private apt state (the machine's own apt
//! configuration and package lists are never touched) and unpacked into a cache that later
//! runs reuse: a kernel (`boot/vmlinuz-*` and its modules) per suite, and busybox-static.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util;

/// The keyring that signs every Debian suite we use (bullseye, bookworm and trixie keys are
/// all in bookworm's `debian-archive-keyring`).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MIRROR: &str = "http://deb.debian.org/debian";

/// A Debian suite's private apt state under `cache/apt-<suite>/`.
pub struct Suite {
    name: &'static str,
    dir: PathBuf,
}

impl Suite {
    pub fn new(cache: &Path, name: &'static str) -> Self {
        Self {
            name,
            dir: cache.join(format!("apt-{name}")),
        }
    }

    fn apt(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.dir)
            .arg("-q")
            .arg("-o")
            .arg(format!(
                "Dir::Etc::sourcelist={}",
                self.dir.join("sources.list").display()
            ))
            .args(["-o", "Dir::Etc::sourceparts=/dev/null"])
            .arg("-o")
            .arg(format!(
                "Dir::State::Lists={}",
                self.dir.join("lists").display()
            ))
            .arg("-o")
            .arg(format!("Dir::Cache={}", self.dir.join("cache").display()))
            // Downloads land in our own folder; apt's `_apt` sandbox user could not write there.
            .args(["-o", "APT::Sandbox::User=root"]);
        cmd
    }

    /// `apt-get update` for this suite, once per cache (delete the folder to refresh).
    fn update(&self) -> Result<()> {
        let stamp = self.dir.join("updated");
        if stamp.exists() {
            return Ok(());
        }
        fs::create_dir_all(self.dir.join("lists/partial"))?;
        fs::create_dir_all(self.dir.join("cache/archives/partial"))?;
        fs::write(
            self.dir.join("sources.list"),
            format!("deb [signed-by={KEYRING}] {MIRROR} {} main\n", self.name),
        )?;
        eprintln!("vm-test: apt-get update for Debian {}", self.name);
        util::run_quiet(self.apt("apt-get").arg("update"))
            .with_context(|| format!("apt-get update of Debian {}", self.name))?;
        fs::write(stamp, "")?;
        Ok(())
    }

    /// The package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-41-amd64`.
    fn kernel_package(&self) -> Result<String> {
        let out = util::run_quiet(self.apt("apt-cache").args(["depends", "linux-image-amd64"]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|dep| dep.starts_with("linux-image-") && !dep.starts_with("linux-image-amd64"))
            .map(str::to_owned)
            .with_context(|| format!("no linux-image dependency in:\n{text}"))
    }

    /// Downloads `package` and unpacks it (`dpkg -x`) into `dest`, replacing what was there.
    fn unpack(&self, package: &str, dest: &Path) -> Result<()> {
        let debs = self.dir.join("debs");
        fs::create_dir_all(&debs)?;
        for entry in fs::read_dir(&debs)? {
            fs::remove_file(entry?.path())?;
        }
        eprintln!("vm-test: downloading {package} from Debian {}", self.name);
        util::run_quiet(
            self.apt("apt-get")
                .current_dir(&debs)
                .args(["download", package]),
        )?;
        let deb = fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|ext| ext == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let partial = dest.with_extension("partial");
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial)?;
        util::run_quiet(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
        let _ = fs::remove_dir_all(dest);
        fs::rename(&partial, dest)?;
        fs::remove_file(deb)?;
        Ok(())
    }
}

/// An unpacked Debian kernel: its image and its modules folder.
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// The kernel of `suite`, from the cache or downloaded into it.
pub fn kernel(cache: &Path, suite: &'static str) -> Result<Kernel> {
    let dest = cache.join(format!("kernel-{suite}"));
    if !dest.join("boot").is_dir() {
        let suite = Suite::new(cache, suite);
        suite.update()?;
        let package = suite.kernel_package()?;
        suite.unpack(&package, &dest)?;
    }
    let vmlinuz = fs::read_dir(dest.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", dest.display()))?;
    let release = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    // Bullseye and bookworm keep modules in lib/modules, trixie (merged /usr) in usr/lib/modules.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| dest.join(dir).join(&release))
        .find(|dir| dir.join("kernel").is_dir())
        .with_context(|| format!("no modules for {release} in {}", dest.display()))?;
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// `bin/busybox` of Debian's busybox-static (bookworm), from the cache or downloaded into it.
pub fn busybox(cache: &Path) -> Result<PathBuf> {
    let dest = cache.join("busybox-static");
    let bin = dest.join("bin/busybox");
    if !bin.exists() {
        let suite = Suite::new(cache, "bookworm");
        suite.update()?;
        suite.unpack("busybox-static", &dest)?;
    }
    if !bin.exists() {
        bail!("busybox-static has no bin/busybox");
    }
    Ok(bin)
}

/// The modules `wanted` (by name, e.g. `veth`) and everything they depend on, in load order
/// (dependencies first), as paths relative to the modules folder. Debian's packages carry no
/// `modules.dep` (depmod writes it when the package is installed), so dependencies are read
/// from each module with `modinfo -F depends`; built-in modules are skipped.
pub fn modules_in_load_order(modules: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let mut files = std::collections::HashMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path.to_string_lossy()) {
                let relative = path.strip_prefix(modules).unwrap_or(&path);
                files.insert(name, relative.to_string_lossy().into_owned());
            }
        }
    }
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let builtin: Vec<String> = builtin.lines().filter_map(module_name).collect();
    let mut order = Vec::new();
    let mut todo: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|w| (w.replace('-', "_"), false))
        .collect();
    // Depth first: a module is pushed to `order` once all its dependencies are.
    while let Some((name, expanded)) = todo.pop() {
        if order.iter().any(|(n, _)| *n == name) || builtin.contains(&name) {
            continue;
        }
        let Some(file) = files.get(&name) else {
            bail!(
                "module {name} is neither in nor built into {}",
                modules.display()
            );
        };
        if expanded {
            order.push((name, file.clone()));
            continue;
        }
        let out = util::run_quiet(
            Command::new("modinfo")
                .args(["-F", "depends"])
                .arg(modules.join(file)),
        )?;
        todo.push((name, true));
        for dep in String::from_utf8_lossy(&out.stdout).trim().split(',') {
            if !dep.is_empty() {
                todo.push((dep.replace('-', "_"), false));
            }
        }
    }
    Ok(order.into_iter().map(|(_, file)| file).collect())
}

/// `veth` for `.../veth.ko`, `.ko.xz`, `.ko.zst`; None for other files.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let (name, _) = file.split_once(".ko")?;
    Some(name.replace('-', "_"))
}
