//! np-apiserver: the in-memory test Kubernetes API server (tests::apiserver) as a program, for
//! trying the agent or kubectl by hand.
//!
//! ```sh
//! np-apiserver --listen 127.0.0.1:8080 --kubeconfig /tmp/np.kubeconfig --seed manifests/
//! kubectl --kubeconfig /tmp/np.kubeconfig get services -A
//! ```
//!
//! `--state DIR` keeps the objects across runs in `DIR/state.json` (loaded at start, written
//! after changes). `--seed PATH` creates the objects of a manifest file or of every
//! `*.yaml|*.yml|*.json` in a folder (multi-document YAML allowed) at start.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use serde_json::Value;
use tests::apiserver::{ApiServer, ApiServerConfig};

#[derive(Parser, Debug)]
#[command(about = "In-memory Kubernetes API server for nodeport tests (no auth, plain HTTP)")]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Folder for state.json: loaded at start, rewritten after changes.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Manifest file or folder whose objects are created (or updated) at start.
    #[arg(long)]
    seed: Vec<PathBuf>,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 60.0)]
    bookmark_interval: f64,
    /// Watch events kept for replay; older resourceVersions get 410 Expired.
    #[arg(long, default_value_t = 1000)]
    history: usize,
}

fn manifest_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn seed(server: &ApiServer, path: &Path) -> Result<usize> {
    let mut n = 0;
    for file in manifest_files(path)? {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v =
                Value::deserialize(doc).with_context(|| format!("parsing {}", file.display()))?;
            let items = match v.get("kind").and_then(Value::as_str) {
                Some("List") => v
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                Some(_) => vec![v],
                None => continue,
            };
            for item in items {
                server
                    .apply_value(item)
                    .with_context(|| format!("creating an object of {}", file.display()))?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn save(server: &ApiServer, dir: &Path) -> Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&server.export_state())?)?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.bookmark_interval.is_nan() || args.bookmark_interval <= 0.0 {
        bail!("--bookmark-interval must be positive");
    }
    let server = ApiServer::start_with(ApiServerConfig {
        listen: args.listen,
        history_limit: args.history,
        bookmark_interval: Duration::from_secs_f64(args.bookmark_interval),
        seed_namespaces: true,
    })?;
    if let Some(dir) = &args.state {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("state.json");
        if file.is_file() {
            let state: Value = serde_json::from_slice(&std::fs::read(&file)?)
                .with_context(|| format!("parsing {}", file.display()))?;
            server.import_state(&state)?;
            eprintln!("np-apiserver: loaded {}", file.display());
        }
    }
    for path in &args.seed {
        let n = seed(&server, path)?;
        eprintln!("np-apiserver: {n} objects from {}", path.display());
    }
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
        eprintln!("np-apiserver: kubeconfig in {}", path.display());
    }
    println!("np-apiserver: serving on {}", server.url());

    install_signal_flag();
    let mut saved_rv = 0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(dir) = &args.state {
            let rv = server.resource_version();
            if rv != saved_rv {
                save(&server, dir)?;
                saved_rv = rv;
            }
        }
        if SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
    }
    if let Some(dir) = &args.state {
        save(&server, dir)?;
    }
    eprintln!("np-apiserver: stopped");
    Ok(())
}

static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn install_signal_flag() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}
