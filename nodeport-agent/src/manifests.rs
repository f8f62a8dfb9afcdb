//! The manifests-folder source: Services, EndpointSlices and Nodes read from YAML/JSON files
//! in one directory instead of the API server, and a poller that reloads them on change.
//! A document that does not parse is refused by itself; the other documents still load.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::model::Refusal;

/// The objects of a manifests folder.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// What [`watch`] publishes: the objects and the refusals of one load.
pub type Loaded = Arc<(Objects, Vec<Refusal>)>;

/// Whether `path` is a manifest file by its extension (`yaml`, `yml`, `json`).
fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Manifest files of `dir`, sorted by name, not recursive.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if is_manifest(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every `*.yaml`, `*.yml` and `*.json` file of `dir` (sorted by name, not recursive).
///
/// - YAML files may hold several documents (`---`); JSON files hold one. Empty documents
///   are skipped.
/// - A `kind: List` (or `ServiceList`, ...) document contributes its `items`.
/// - Kept: `v1` `Service`, `discovery.k8s.io/v1` `EndpointSlice`, `v1` `Node`. Other kinds
///   and API groups (Deployment, Pod, a Knative `Service`, ...) are ignored silently.
///   A kept kind with another version of its group (e.g. `discovery.k8s.io/v1beta1`) is
///   refused.
/// - A document or item that fails to parse is refused, naming the file, the document
///   index (from 0), and the kind and name when known, with the parser's error.
/// - A missing `metadata.namespace` of a Service or EndpointSlice becomes `default`.
/// - An unreadable directory or file is refused as a whole.
pub fn load_dir(dir: &Path) -> (Objects, Vec<Refusal>) {
    let mut objects = Objects::default();
    let mut refusals = Vec::new();
    let files = match manifest_files(dir) {
        Ok(f) => f,
        Err(e) => {
            refusals.push(Refusal::new(
                format!("directory {}", dir.display()),
                format!("cannot be read: {e}"),
            ));
            return (objects, refusals);
        }
    };
    for file in files {
        load_file(&file, &mut objects, &mut refusals);
    }
    (objects, refusals)
}

fn load_file(file: &Path, objects: &mut Objects, refusals: &mut Vec<Refusal>) {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            refusals.push(Refusal::new(
                format!("file {}", file.display()),
                format!("cannot be read: {e}"),
            ));
            return;
        }
    };
    let is_json = file.extension().and_then(|e| e.to_str()) == Some("json");
    let docs: Vec<Result<Value, String>> = if is_json {
        vec![serde_json::from_str(&text).map_err(|e| e.to_string())]
    } else {
        split_documents(&text)
            .into_iter()
            .map(|d| serde_yaml::from_str(&d).map_err(|e| e.to_string()))
            .collect()
    };
    for (i, doc) in docs.into_iter().enumerate() {
        let place = format!("file {} document {i}", file.display());
        match doc {
            Ok(v) => load_value(v, &place, objects, refusals),
            Err(e) => refusals.push(Refusal::new(place, format!("does not parse: {e}"))),
        }
    }
}

/// Splits a YAML stream into its documents at `---` and `...` lines (column 0), so that a
/// syntax error in one document cannot affect the others (serde_yaml's multi-document
/// iterator keeps returning the same error, or panics, after one). Content after `--- ` on
/// the same line starts the next document. Text before the first `---`, or after the last
/// separator, that holds only comments and blank lines is not a document.
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut first = true;
    let blank = |d: &str| {
        d.lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.starts_with('%'))
    };
    for line in text.lines() {
        let rest = if line == "---" || line == "..." {
            Some("")
        } else {
            line.strip_prefix("--- ")
                .or_else(|| line.strip_prefix("---\t"))
        };
        match rest {
            Some(rest) => {
                if !(first && blank(&cur)) {
                    docs.push(std::mem::take(&mut cur));
                }
                cur.clear();
                first = false;
                if !rest.is_empty() {
                    cur.push_str(rest);
                    cur.push('\n');
                }
            }
            None => {
                cur.push_str(line);
                cur.push('\n');
            }
        }
    }
    if !blank(&cur) || docs.is_empty() {
        docs.push(cur);
    }
    docs
}

fn load_value(v: Value, place: &str, objects: &mut Objects, refusals: &mut Vec<Refusal>) {
    if v.is_null() {
        return; // empty document
    }
    let Some(obj) = v.as_object() else {
        refusals.push(Refusal::new(place, "is not a mapping"));
        return;
    };
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    // API group: "" for the core group ("v1").
    let group = api_version
        .rsplit_once('/')
        .map_or("", |(g, _)| g)
        .to_string();
    if kind.ends_with("List") {
        if let Some(items) = obj.get("items").and_then(Value::as_array) {
            for (j, item) in items.iter().enumerate() {
                load_value(
                    item.clone(),
                    &format!("{place} item {j}"),
                    objects,
                    refusals,
                );
            }
            return;
        }
    }
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let refuse = |refusals: &mut Vec<Refusal>, e: serde_json::Error| {
        refusals.push(Refusal::new(
            format!("{place} ({kind} {name})"),
            format!("does not parse: {e}"),
        ));
    };
    match (group.as_str(), kind.as_str()) {
        ("", "Service") => match serde_json::from_value::<Service>(v) {
            Ok(mut s) => {
                s.metadata.namespace.get_or_insert_with(|| "default".into());
                objects.services.push(s);
            }
            Err(e) => refuse(refusals, e),
        },
        ("discovery.k8s.io", "EndpointSlice") => match serde_json::from_value::<EndpointSlice>(v) {
            Ok(mut s) => {
                s.metadata.namespace.get_or_insert_with(|| "default".into());
                objects.slices.push(s);
            }
            Err(e) => refuse(refusals, e),
        },
        ("", "Node") => match serde_json::from_value::<Node>(v) {
            Ok(n) => objects.nodes.push(n),
            Err(e) => refuse(refusals, e),
        },
        ("", "") => refusals.push(Refusal::new(place, "has no kind")),
        _ => {}
    }
}

/// A fingerprint of the manifest files of `dir`: their names, sizes, modification times
/// and contents. It changes when a file is added, removed, renamed or edited (even within
/// the mtime granularity, through the contents).
pub fn fingerprint(dir: &Path) -> std::io::Result<u64> {
    let mut h = DefaultHasher::new();
    for file in manifest_files(dir)? {
        let meta = fs::metadata(&file)?;
        file.file_name().hash(&mut h);
        meta.len().hash(&mut h);
        if let Ok(t) = meta.modified() {
            t.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .hash(&mut h);
        }
        fs::read(&file)?.hash(&mut h);
    }
    Ok(h.finish())
}

/// Polls `dir` every `interval` and publishes a fresh [`load_dir`] on `tx` when the files
/// change. Returns when every receiver is gone.
///
/// - The first load is published as soon as the directory can be read. Until then nothing
///   is published (an agent must not mistake a missing folder for "no services" and delete
///   everything); the problem is logged.
/// - A change is loaded once the fingerprint has stayed the same for one interval, so a file
///   caught half-written is not loaded.
/// - A directory that becomes unreadable later keeps the last published state (logged).
pub async fn watch(dir: PathBuf, interval: Duration, tx: tokio::sync::watch::Sender<Loaded>) {
    let mut loaded: Option<u64> = None; // fingerprint of the last published load
    let mut seen: Option<u64> = None; // fingerprint of the previous poll
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if tx.is_closed() {
            return;
        }
        let d = dir.clone();
        let fp = match tokio::task::spawn_blocking(move || fingerprint(&d)).await {
            Ok(Ok(fp)) => fp,
            Ok(Err(e)) => {
                if seen.is_some() || loaded.is_none() {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the manifests directory");
                }
                seen = None;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "manifests fingerprint task failed");
                continue;
            }
        };
        let settled = loaded.is_none() || seen == Some(fp);
        seen = Some(fp);
        if loaded == Some(fp) || !settled {
            continue;
        }
        let d = dir.clone();
        let Ok(result) = tokio::task::spawn_blocking(move || load_dir(&d)).await else {
            tracing::error!("manifests load task failed");
            continue;
        };
        for r in &result.1 {
            tracing::warn!("{r}");
        }
        tracing::info!(
            dir = %dir.display(),
            services = result.0.services.len(),
            slices = result.0.slices.len(),
            nodes = result.0.nodes.len(),
            refused = result.1.len(),
            "loaded manifests"
        );
        loaded = Some(fp);
        if tx.send(Arc::new(result)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).expect("write test manifest");
    }

    const SVC: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  ports: [{port: 80, nodePort: 30080}]
";

    /// The Node's zone label and the slices' hints reach the model from a folder: node n1
    /// in zone-a uses the endpoint hinted for zone-a only.
    #[test]
    fn zone_labels_and_hints_reach_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            "a.yaml",
            &format!(
                "{SVC}
---
apiVersion: v1
kind: Node
metadata: {{name: n1, labels: {{topology.kubernetes.io/zone: zone-a}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: '', port: 8080}}]
endpoints:
- {{addresses: [10.0.0.1], hints: {{forZones: [{{name: zone-a}}]}}}}
- {{addresses: [10.0.0.2], hints: {{forZones: [{{name: zone-b}}]}}}}
"
            ),
        );
        let (o, r) = load_dir(d);
        assert!(r.is_empty(), "{r:?}");
        let (desired, r) = crate::model::desired(&crate::model::Inputs {
            services: &o.services,
            slices: &o.slices,
            nodes: &o.nodes,
            node_name: "n1",
            interface_addrs: &[],
            settings: &crate::model::Settings::default(),
        });
        assert!(r.is_empty(), "{r:?}");
        let ds = desired.services.values().next().expect("web is served");
        let table: Vec<String> = ds
            .table_backends()
            .map(|b| crate::model::addr_from_raw(b.addr).to_string())
            .collect();
        assert_eq!(table, ["10.0.0.1"]);
    }

    #[test]
    fn loads_kinds_and_documents() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            "a.yaml",
            &format!(
                "{SVC}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec: {{}}
---
# empty document follows
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{{addresses: [10.0.0.1]}}]
"
            ),
        );
        write(
            d,
            "b.json",
            r#"{"apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s2", "namespace": "x"}},
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
            ]}"#,
        );
        write(
            d,
            "c.yml",
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\n",
        );
        write(d, "ignored.txt", "not: [a manifest");
        fs::create_dir(d.join("sub")).unwrap();
        write(&d.join("sub"), "deep.yaml", SVC);

        let (o, r) = load_dir(d);
        assert!(r.is_empty(), "{r:?}");
        let names: Vec<_> = o
            .services
            .iter()
            .map(|s| {
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or("?"),
                    s.metadata.name.as_deref().unwrap_or("?")
                )
            })
            .collect();
        assert_eq!(names, ["default/web", "x/s2"]);
        assert_eq!(o.slices.len(), 1);
        assert_eq!(o.slices[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(o.nodes.len(), 1);
        assert_eq!(o.nodes[0].metadata.namespace, None);
    }

    #[test]
    fn bad_documents_are_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            "mixed.yaml",
            &format!(
                "apiVersion: v1
kind: Service
metadata: {{name: broken}}
spec:
  ports: [{{port: eighty}}]
---
{SVC}
---
key: [unclosed
"
            ),
        );
        write(d, "bad.json", "{\"kind\": ");
        write(
            d,
            "old.yaml",
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\naddressType: IPv4\nendpoints: []\n",
        );
        write(d, "nokind.yaml", "metadata: {name: x}\n");

        let (o, r) = load_dir(d);
        assert_eq!(o.services.len(), 1, "the good document still loads");
        assert_eq!(o.services[0].metadata.name.as_deref(), Some("web"));
        let text: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(r.len(), 5, "{text:#?}");
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(
            has("mixed.yaml document 0 (Service broken): does not parse"),
            "{text:#?}"
        );
        assert!(has("mixed.yaml document 2: does not parse"), "{text:#?}");
        assert!(has("bad.json document 0: does not parse"), "{text:#?}");
        assert!(
            has("old.yaml document 0 (EndpointSlice old): does not parse"),
            "{text:#?}"
        );
        assert!(has("nokind.yaml document 0: has no kind"), "{text:#?}");
    }

    #[test]
    fn splits_documents() {
        assert_eq!(split_documents("a: 1\n"), ["a: 1\n"]);
        assert_eq!(
            split_documents("# c\n---\na: 1\n---\nb: 2\n"),
            ["a: 1\n", "b: 2\n"]
        );
        assert_eq!(
            split_documents("a: 1\n---\n---\nb: 2\n...\n"),
            ["a: 1\n", "", "b: 2\n"]
        );
        assert_eq!(split_documents("--- {a: 1}\n--- x\n"), ["{a: 1}\n", "x\n"]);
        assert_eq!(
            split_documents("key: |\n  ---\n  text\n"),
            ["key: |\n  ---\n  text\n"]
        );
        assert_eq!(split_documents(""), [""]);
    }

    #[test]
    fn missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (o, r) = load_dir(&dir.path().join("nope"));
        assert_eq!(o, Objects::default());
        assert_eq!(r.len(), 1);
        assert!(r[0].reason.contains("cannot be read"));
        assert!(fingerprint(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn fingerprint_changes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let f0 = fingerprint(d).unwrap();
        write(d, "a.yaml", SVC);
        let f1 = fingerprint(d).unwrap();
        assert_ne!(f0, f1);
        assert_eq!(f1, fingerprint(d).unwrap());
        // Same size, different contents.
        write(d, "a.yaml", &SVC.replace("30080", "30081"));
        let f2 = fingerprint(d).unwrap();
        assert_ne!(f1, f2);
        write(d, "notes.txt", "ignored");
        assert_eq!(f2, fingerprint(d).unwrap());
        fs::rename(d.join("a.yaml"), d.join("b.yaml")).unwrap();
        assert_ne!(f2, fingerprint(d).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reloads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        write(&d, "a.yaml", SVC);
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new((Objects::default(), Vec::new())));
        let task = tokio::spawn(watch(d.clone(), Duration::from_millis(500), tx));

        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().0.services.len(), 1);

        write(
            &d,
            "b.yaml",
            &SVC.replace("name: web", "name: web2")
                .replace("30080", "30081"),
        );
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("reload within 10 s")
            .unwrap();
        assert_eq!(rx.borrow_and_update().0.services.len(), 2);

        // No change: nothing published.
        assert!(tokio::time::timeout(Duration::from_secs(3), rx.changed())
            .await
            .is_err());

        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watch returns once the receivers are gone")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn watch_waits_for_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("later");
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new((Objects::default(), Vec::new())));
        let task = tokio::spawn(watch(d.clone(), Duration::from_millis(500), tx));
        assert!(tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .is_err());
        fs::create_dir(&d).unwrap();
        write(&d, "a.yaml", SVC);
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("first load once the directory exists")
            .unwrap();
        assert_eq!(rx.borrow().0.services.len(), 1);
        task.abort();
    }
}
