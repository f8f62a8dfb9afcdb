//! A small in-memory Kubernetes API server for tests: it speaks the real list/watch HTTP
//! protocol (the one kubectl and kube-rs use) and lets tests inject faults.
//!
//! Scope: `Service` (v1), `EndpointSlice` (discovery.k8s.io/v1), `Node` (v1) and `Namespace`
//! (v1), plain HTTP on 127.0.0.1, no authentication, JSON only.
//!
//! What it keeps like the real server:
//! - one global, monotonically increasing resourceVersion (etcd's revision); every write bumps
//!   it and stamps it on the object; a delete bumps it too and the DELETED event carries it;
//! - LIST with `limit`/`continue` (consistent snapshot), `labelSelector`, `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`, any dotted path), `resourceVersion` with
//!   `resourceVersionMatch=NotOlderThan|Exact` (410 Expired when the revision was compacted);
//! - WATCH (`?watch=true` or the old `/watch/` paths): newline-delimited JSON events on a
//!   chunked response, replayed from a bounded history after `resourceVersion`; an ERROR event
//!   with a 410 Expired Status when that revision is older than the history; periodic BOOKMARK
//!   events with `allowWatchBookmarks=true`; `timeoutSeconds`; `sendInitialEvents=true`
//!   (streaming lists, ending with the `k8s.io/initial-events-end` bookmark); synthetic ADDED
//!   events for `resourceVersion` unset or "0"; ADDED/DELETED when an object enters or leaves a
//!   selector;
//! - writes: POST, PUT, PATCH (merge, strategic merge for the common list keys, server-side
//!   apply as a merge), DELETE with preconditions, `dryRun=All`, 409 AlreadyExists/Conflict,
//!   404 NotFound, 422 Invalid; a no-op update does not bump the resourceVersion;
//! - finalizers: DELETE of an object with `metadata.finalizers` sets `deletionTimestamp`
//!   (a MODIFIED event) and keeps it until an update leaves no finalizer, which deletes it;
//! - Service defaulting as the real server does it: type ClusterIP, protocol TCP, targetPort =
//!   port, sessionAffinity, traffic policies, a clusterIP from 10.96.0.0/12 (a string only, no
//!   traffic ever goes there), nodePorts allocated from the top of 30000-32767 (preserved on
//!   update when omitted), 422 when a nodePort is out of range or already allocated;
//! - discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/discovery.k8s.io[/v1]`); a
//!   request for aggregated discovery (`as=APIGroupDiscoveryList`) gets the legacy document
//!   with a plain `application/json` content type, which clients take as "not supported";
//! - `as=Table` requests (kubectl's human output) get a `meta.k8s.io/v1` Table with the real
//!   server's columns.
//!
//! Simplifications: no authentication or admission, the namespace of a namespaced object need
//! not exist, status is writable through the main resource, no managedFields, no JSON patch.
//!
//! Fault injection (see [`ApiServer`]): [`ApiServer::cut_watches`] (abort every open watch
//! stream), [`ApiServer::close_watches`] (end them cleanly), [`ApiServer::fail_next`] (the next
//! K requests get a 500 Status), [`ApiServer::set_delay`], [`ApiServer::compact`] (drop the
//! event history: older resourceVersions get 410), [`ApiServer::stop`] / [`ApiServer::restart`]
//! (refuse connections while stopped).
//!
//! The server runs on its own small tokio runtime, so it works the same from synchronous tests,
//! from `#[tokio::test]` (also while the test thread blocks, e.g. on a `kubectl` process) and
//! from the `np-apiserver` binary. All methods of [`ApiServer`] are synchronous.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

/// The Kubernetes version the server reports.
pub const SERVER_VERSION: (&str, &str) = ("1", "33");
const SERVER_GIT_VERSION: &str = "v1.33.0-nodeport-test";
/// The real server's default NodePort range.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Largest request body accepted (the real server's limit is 3 MiB too).
const MAX_BODY: usize = 3 << 20;
/// Continue-token snapshots kept at once.
const MAX_SNAPSHOTS: usize = 64;
/// Request records kept for [`ApiServer::requests`].
const MAX_REQUEST_LOG: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Kinds

/// The object kinds this server stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Service,
    EndpointSlice,
}

struct KindInfo {
    kind: &'static str,
    list_kind: &'static str,
    group: &'static str,
    api_version: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
}

impl Kind {
    /// Every kind, in discovery order.
    pub const ALL: [Kind; 4] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    fn info(self) -> &'static KindInfo {
        match self {
            Kind::Namespace => &KindInfo {
                kind: "Namespace",
                list_kind: "NamespaceList",
                group: "",
                api_version: "v1",
                plural: "namespaces",
                singular: "namespace",
                namespaced: false,
                short_names: &["ns"],
                categories: &[],
            },
            Kind::Node => &KindInfo {
                kind: "Node",
                list_kind: "NodeList",
                group: "",
                api_version: "v1",
                plural: "nodes",
                singular: "node",
                namespaced: false,
                short_names: &["no"],
                categories: &[],
            },
            Kind::Service => &KindInfo {
                kind: "Service",
                list_kind: "ServiceList",
                group: "",
                api_version: "v1",
                plural: "services",
                singular: "service",
                namespaced: true,
                short_names: &["svc"],
                categories: &["all"],
            },
            Kind::EndpointSlice => &KindInfo {
                kind: "EndpointSlice",
                list_kind: "EndpointSliceList",
                group: "discovery.k8s.io",
                api_version: "discovery.k8s.io/v1",
                plural: "endpointslices",
                singular: "endpointslice",
                namespaced: true,
                short_names: &[],
                categories: &[],
            },
        }
    }

    /// `kind` as written in objects ("Service").
    pub fn name(self) -> &'static str {
        self.info().kind
    }

    /// `apiVersion` as written in objects ("v1", "discovery.k8s.io/v1").
    pub fn api_version(self) -> &'static str {
        self.info().api_version
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        self.info().namespaced
    }

    /// The kind for an object's `kind` and `apiVersion`.
    pub fn from_kind(kind: &str, api_version: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.info().kind == kind && k.info().api_version == api_version)
    }

    fn from_plural(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.info().group == group && k.info().plural == plural)
    }

    /// The kind of a k8s-openapi type.
    pub fn of<K: k8s_openapi::Resource>() -> Result<Kind, ApiError> {
        Kind::from_kind(K::KIND, K::API_VERSION).ok_or_else(|| {
            ApiError::bad_request(format!(
                "kind {} ({}) is not served by this test API server",
                K::KIND,
                K::API_VERSION
            ))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A failed API call, as the server reports it in a `Status` object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason` (NotFound, AlreadyExists, Conflict, Invalid, BadRequest, Expired, ...).
    pub reason: String,
    pub message: String,
    details: Option<(String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, kind: Kind, name: &str) -> Self {
        self.details = Some((kind.info().plural.to_string(), name.to_string()));
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", qualified(kind), name),
        )
        .with_details(kind, name)
    }

    fn invalid(kind: Kind, name: &str, causes: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{}\" is invalid: {}", kind.info().kind, name, causes),
        )
        .with_details(kind, name)
    }

    fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object for this error.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((kind, name)) = &self.details {
            s["details"] = json!({ "name": name, "kind": kind });
        }
        s
    }
}

/// "services" or "endpointslices.discovery.k8s.io", as the real server names resources in
/// messages.
fn qualified(kind: Kind) -> String {
    let i = kind.info();
    if i.group.is_empty() {
        i.plural.to_string()
    } else {
        format!("{}.{}", i.plural, i.group)
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: time, ids, JSON access

fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// splitmix64 over an atomic counter: cheap unique-enough ids without a rand dependency.
struct Rng(AtomicU64);

impl Rng {
    fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32);
        Rng(AtomicU64::new(seed))
    }

    fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uid(&self) -> String {
        let (a, b) = (self.next(), self.next());
        let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }

    /// Five characters from the alphabet the real server uses for generateName.
    fn name_suffix(&self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = self.next();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }
}

fn meta(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj)
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let m = obj
        .as_object_mut()
        .expect("object")
        .entry("metadata")
        .or_insert_with(|| json!({}));
    if !m.is_object() {
        *m = json!({});
    }
    m.as_object_mut().expect("object")
}

fn obj_name(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or("")
}

fn obj_namespace(obj: &Value) -> &str {
    meta_str(obj, "namespace").unwrap_or("")
}

fn obj_rv(obj: &Value) -> Option<&str> {
    meta_str(obj, "resourceVersion")
}

fn set_rv(obj: &mut Value, rv: u64) {
    meta_mut(obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
}

/// The object as written in a list response: without kind and apiVersion, as the real server
/// writes items.
fn list_item(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

/// Dotted-path lookup rendered as the string a field selector compares with.
fn field_value(obj: &Value, path: &str) -> Option<String> {
    let mut cur = obj;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default)]
struct Selector {
    labels: Vec<LabelReq>,
    /// (path, value, equal?)
    fields: Vec<(String, String, bool)>,
}

fn split_top_level_commas(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_set(s: &str) -> Result<Vec<String>, ApiError> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("unable to parse requirement: {s}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    fn parse(label: Option<&str>, field: Option<&str>) -> Result<Self, ApiError> {
        let mut sel = Selector::default();
        for term in label.map(split_top_level_commas).unwrap_or_default() {
            let req = if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, set)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), parse_set(set)?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), parse_set(set)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else {
                LabelReq::Exists(term.to_string())
            };
            sel.labels.push(req);
        }
        for term in field.map(split_top_level_commas).unwrap_or_default() {
            let (path, value, eq) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            sel.fields
                .push((path.trim().to_string(), value.trim().to_string(), eq));
        }
        Ok(sel)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = meta(obj).and_then(|m| m.get("labels"));
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, set) => label(k).is_some_and(|x| set.iter().any(|s| s == x)),
            LabelReq::NotIn(k, set) => !label(k).is_some_and(|x| set.iter().any(|s| s == x)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, value, eq)| {
                (field_value(obj, path).unwrap_or_default() == *value) == *eq
            })
    }
}

/// What a list or watch selects: a kind, maybe a namespace and a name, and the selectors.
#[derive(Clone, Debug)]
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    selector: Selector,
    /// Render event objects as one-row Tables (kubectl's human-readable `--watch`).
    as_table: bool,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| obj_namespace(obj) == ns)
            && self.name.as_deref().is_none_or(|n| obj_name(obj) == n)
            && self.selector.matches(obj)
    }

    /// One watch event line for `obj`.
    fn line(&self, ty: &str, obj: &Value) -> Bytes {
        if self.as_table {
            let rv = obj_rv(obj).unwrap_or("").to_string();
            event_line(
                ty,
                &table(
                    self.kind,
                    std::slice::from_ref(obj),
                    json!({ "resourceVersion": rv }),
                ),
            )
        } else {
            event_line(ty, obj)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Store

type Key = (Kind, String, String);

fn key_of(kind: Kind, obj: &Value) -> Key {
    (
        kind,
        obj_namespace(obj).to_string(),
        obj_name(obj).to_string(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: Kind,
    ty: EventType,
    object: Value,
    prev: Option<Value>,
}

struct Snapshot {
    id: u64,
    rv: u64,
    items: Arc<Vec<Value>>,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Events with rv in (oldest, rv], in order.
    history: VecDeque<Event>,
    history_limit: usize,
    /// Every event after this revision is in `history`; watching from older ones gets 410.
    oldest: u64,
    snapshots: VecDeque<Snapshot>,
    next_snapshot: u64,
}

impl Store {
    fn record(&mut self, kind: Kind, ty: EventType, object: Value, prev: Option<Value>) {
        self.history.push_back(Event {
            rv: self.rv,
            kind,
            ty,
            object,
            prev,
        });
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.oldest = e.rv;
            }
        }
        self.drop_stale_snapshots();
    }

    fn drop_stale_snapshots(&mut self) {
        let oldest = self.oldest;
        self.snapshots.retain(|s| s.rv >= oldest);
    }

    fn compact(&mut self) -> u64 {
        self.history.clear();
        self.oldest = self.rv;
        self.drop_stale_snapshots();
        self.rv
    }

    fn objects_of(&self, kind: Kind) -> impl Iterator<Item = &Value> {
        self.objects
            .range((kind, String::new(), String::new())..)
            .take_while(move |((k, _, _), _)| *k == kind)
            .map(|(_, v)| v)
    }

    /// The objects of `kind` as they were at revision `rv` (needs `rv >= oldest`).
    fn state_at(&self, kind: Kind, rv: u64) -> Vec<Value> {
        let mut state: BTreeMap<Key, Value> = self
            .objects_of(kind)
            .map(|o| (key_of(kind, o), o.clone()))
            .collect();
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if e.kind != kind {
                continue;
            }
            let key = key_of(kind, &e.object);
            match (&e.ty, &e.prev) {
                (EventType::Added, _) => {
                    state.remove(&key);
                }
                (_, Some(prev)) => {
                    state.insert(key, prev.clone());
                }
                (_, None) => {}
            }
        }
        state.into_values().collect()
    }

    fn too_old(&self, rv: u64) -> ApiError {
        ApiError::expired(format!("too old resource version: {rv} ({})", self.oldest))
    }

    // -- writes --------------------------------------------------------------------------------

    /// Checks kind/apiVersion and places the object in `namespace` (from the URL when given).
    fn normalize(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request is not an object",
            ));
        }
        let info = kind.info();
        for (field, want) in [("kind", info.kind), ("apiVersion", info.api_version)] {
            match obj.get(field).and_then(Value::as_str) {
                Some(have) if !have.is_empty() && have != want => {
                    return Err(ApiError::bad_request(format!(
                        "the API version in the data ({}) does not match the expected API \
                         version ({}) or kind {} does not match {}",
                        obj.get("apiVersion")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                        info.api_version,
                        obj.get("kind").and_then(Value::as_str).unwrap_or_default(),
                        info.kind
                    )))
                }
                _ => {
                    obj[field] = Value::String(want.to_string());
                }
            }
        }
        let body_ns = obj_namespace(obj).to_string();
        let m = meta_mut(obj);
        if info.namespaced {
            let ns = match (namespace, body_ns.as_str()) {
                (Some(url), body) if !body.is_empty() && body != url => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace \
                         sent on the request",
                    ))
                }
                (Some(url), _) => url.to_string(),
                (None, "") => "default".to_string(),
                (None, body) => body.to_string(),
            };
            m.insert("namespace".into(), Value::String(ns));
        } else {
            m.remove("namespace");
        }
        Ok(())
    }

    fn create(
        &mut self,
        rng: &Rng,
        kind: Kind,
        namespace: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        self.normalize(kind, namespace, &mut obj)?;
        if meta_str(&obj, "name").is_none() {
            match meta_str(&obj, "generateName").map(str::to_string) {
                Some(prefix) => {
                    let name = loop {
                        let n = format!("{prefix}{}", rng.name_suffix());
                        let key = (kind, obj_namespace(&obj).to_string(), n.clone());
                        if !self.objects.contains_key(&key) {
                            break n;
                        }
                    };
                    meta_mut(&mut obj).insert("name".into(), Value::String(name));
                }
                None => {
                    return Err(ApiError::invalid(
                        kind,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            }
        }
        let key = key_of(kind, &obj);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", qualified(kind), key.2),
            )
            .with_details(kind, &key.2));
        }
        {
            let m = meta_mut(&mut obj);
            m.remove("resourceVersion");
            m.remove("managedFields");
            m.remove("deletionTimestamp");
            m.insert("uid".into(), Value::String(rng.uid()));
            m.insert("creationTimestamp".into(), Value::String(rfc3339_now()));
        }
        self.default_kind(kind, &mut obj, None)?;
        if dry_run {
            return Ok(obj);
        }
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        self.objects.insert(key, obj.clone());
        self.record(kind, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    fn update(
        &mut self,
        kind: Kind,
        namespace: Option<&str>,
        name: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        self.normalize(kind, namespace, &mut obj)?;
        if let Some(url_name) = name {
            match meta_str(&obj, "name") {
                None => {
                    meta_mut(&mut obj).insert("name".into(), Value::String(url_name.into()));
                }
                Some(n) if n != url_name => {
                    return Err(ApiError::bad_request(
                        "the name of the object does not match the name on the URL",
                    ))
                }
                Some(_) => {}
            }
        }
        let key = key_of(kind, &obj);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, &key.2))?;
        if let Some(want) = obj_rv(&obj) {
            if Some(want) != obj_rv(&old) {
                return Err(conflict(kind, &key.2));
            }
        }
        {
            let old_meta = meta(&old).cloned().unwrap_or_default();
            let m = meta_mut(&mut obj);
            for field in ["uid", "creationTimestamp"] {
                if let Some(v) = old_meta.get(field) {
                    m.insert(field.into(), v.clone());
                }
            }
            // Only a DELETE sets these (on an object with finalizers); writes keep them.
            for field in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
                match old_meta.get(field) {
                    Some(v) => m.insert(field.into(), v.clone()),
                    None => m.remove(field),
                };
            }
            m.remove("managedFields");
            m.insert(
                "resourceVersion".into(),
                old_meta
                    .get("resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
        }
        self.default_kind(kind, &mut obj, Some(&old))?;
        if !dry_run && meta(&obj).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            let finalizers = meta(&obj).and_then(|m| m.get("finalizers"));
            if finalizers
                .and_then(Value::as_array)
                .is_none_or(|f| f.is_empty())
            {
                // The last finalizer is gone: the object goes.
                self.objects.remove(&key);
                self.rv += 1;
                set_rv(&mut obj, self.rv);
                self.record(kind, EventType::Deleted, obj.clone(), Some(old));
                return Ok(obj);
            }
        }
        if obj == old || dry_run {
            // The real server does not write (nor bump the revision) for a no-op update.
            return Ok(if dry_run { obj } else { old });
        }
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        self.objects.insert(key, obj.clone());
        self.record(kind, EventType::Modified, obj.clone(), Some(old));
        Ok(obj)
    }

    fn delete(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        preconditions: (Option<String>, Option<String>),
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let key = (kind, ns.to_string(), name.to_string());
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        let (want_rv, want_uid) = preconditions;
        if want_rv.is_some_and(|rv| Some(rv.as_str()) != obj_rv(&old)) {
            return Err(conflict(kind, name));
        }
        if want_uid.is_some_and(|uid| Some(uid.as_str()) != meta_str(&old, "uid")) {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID \
                     in precondition does not match",
                    qualified(kind)
                ),
            )
            .with_details(kind, name));
        }
        if dry_run {
            return Ok(old);
        }
        let finalizers = meta(&old)
            .and_then(|m| m.get("finalizers"))
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if finalizers {
            // Graceful deletion: the object stays, marked, until its finalizers are removed
            // by an update; deleting it again changes nothing.
            if meta(&old).is_some_and(|m| m.contains_key("deletionTimestamp")) {
                return Ok(old);
            }
            let mut obj = old.clone();
            let m = meta_mut(&mut obj);
            m.insert("deletionTimestamp".into(), Value::String(rfc3339_now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            self.rv += 1;
            set_rv(&mut obj, self.rv);
            self.objects.insert(key, obj.clone());
            self.record(kind, EventType::Modified, obj.clone(), Some(old));
            return Ok(obj);
        }
        self.objects.remove(&key);
        self.rv += 1;
        let mut gone = old.clone();
        set_rv(&mut gone, self.rv);
        self.record(kind, EventType::Deleted, gone.clone(), Some(old));
        Ok(gone)
    }

    fn default_kind(
        &self,
        kind: Kind,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        match kind {
            Kind::Service => self.default_service(obj, old),
            Kind::Namespace => {
                let status = obj
                    .as_object_mut()
                    .expect("object")
                    .entry("status")
                    .or_insert_with(|| json!({}));
                if let Some(s) = status.as_object_mut() {
                    s.entry("phase").or_insert_with(|| json!("Active"));
                }
                Ok(())
            }
            Kind::EndpointSlice => {
                if obj.get("addressType").and_then(Value::as_str).is_none() {
                    return Err(ApiError::invalid(
                        kind,
                        obj_name(obj),
                        "addressType: Required value",
                    ));
                }
                Ok(())
            }
            Kind::Node => Ok(()),
        }
    }

    /// Service defaulting and IP/port allocation, as the real server does it.
    fn default_service(&self, obj: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        let name = obj_name(obj).to_string();
        let self_key = key_of(Kind::Service, obj);
        let invalid = |msg: String| ApiError::invalid(Kind::Service, &name, &msg);
        let root = obj.as_object_mut().expect("object");
        let spec = root.entry("spec").or_insert_with(|| json!({}));
        if !spec.is_object() {
            return Err(invalid("spec: Invalid value: must be an object".into()));
        }
        let spec = spec.as_object_mut().expect("object");
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&ty.as_str()) {
            return Err(invalid(format!(
                "spec.type: Unsupported value: \"{ty}\": supported values: \"ClusterIP\", \
                 \"ExternalName\", \"LoadBalancer\", \"NodePort\""
            )));
        }
        spec.insert("type".into(), json!(ty));
        spec.entry("sessionAffinity")
            .or_insert_with(|| json!("None"));
        let external = ty == "ExternalName";
        let node_ports_wanted = ty == "NodePort"
            || (ty == "LoadBalancer"
                && spec
                    .get("allocateLoadBalancerNodePorts")
                    .and_then(Value::as_bool)
                    .unwrap_or(true));
        if !external {
            spec.entry("internalTrafficPolicy")
                .or_insert_with(|| json!("Cluster"));
        }
        if ty == "NodePort" || ty == "LoadBalancer" {
            spec.entry("externalTrafficPolicy")
                .or_insert_with(|| json!("Cluster"));
        }
        if ty == "LoadBalancer" {
            spec.entry("allocateLoadBalancerNodePorts")
                .or_insert_with(|| json!(true));
        }
        let old_spec = old.and_then(|o| o.get("spec"));

        // Cluster IP.
        if external {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        } else {
            let (families, policy) = service_families(spec).map_err(invalid)?;
            let requested = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string);
            let old_ip = old_spec
                .and_then(|s| s.get("clusterIP"))
                .and_then(Value::as_str)
                .map(str::to_string);
            let ip = match (requested, old_ip) {
                (Some(r), Some(o)) if r != o => {
                    return Err(invalid(format!(
                        "spec.clusterIPs[0]: Invalid value: []string{{\"{r}\"}}: may not \
                         change once set"
                    )))
                }
                (Some(r), _) => {
                    if r != "None" && old.is_none() {
                        let taken = self.objects_of(Kind::Service).any(|s| {
                            key_of(Kind::Service, s) != self_key
                                && s.pointer("/spec/clusterIP").and_then(Value::as_str)
                                    == Some(r.as_str())
                        });
                        if taken {
                            return Err(invalid(format!(
                                "spec.clusterIPs: Invalid value: []string{{\"{r}\"}}: failed to \
                                 allocate IP {r}: provided IP is already allocated"
                            )));
                        }
                    }
                    r
                }
                (None, Some(o)) => o,
                (None, None) => self.allocate_cluster_ip(families[0])?,
            };
            // One cluster IP per family, the primary first; a kept secondary stays.
            let mut ips = vec![ip.clone()];
            if let Some(&second) = families.get(1).filter(|_| ip != "None") {
                let old_second = old_spec
                    .and_then(|s| s.pointer("/clusterIPs/1"))
                    .and_then(Value::as_str)
                    .filter(|o| family_of(o) == Some(second))
                    .map(str::to_string);
                ips.push(match old_second {
                    Some(o) => o,
                    None => self.allocate_cluster_ip(second)?,
                });
            }
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!(ips));
            spec.insert("ipFamilies".into(), json!(families));
            spec.insert("ipFamilyPolicy".into(), json!(policy));
        }

        // Ports and node ports.
        let used: BTreeSet<u64> = self
            .objects_of(Kind::Service)
            .filter(|s| key_of(Kind::Service, s) != self_key)
            .flat_map(|s| {
                s.pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                    .collect::<Vec<_>>()
            })
            .collect();
        let old_ports: Vec<Value> = old_spec
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut mine: BTreeSet<u64> = BTreeSet::new();
        let ports = spec.entry("ports").or_insert_with(|| json!([]));
        let Some(ports) = ports.as_array_mut() else {
            return Err(invalid("spec.ports: Invalid value: must be a list".into()));
        };
        for (i, p) in ports.iter_mut().enumerate() {
            let Some(p) = p.as_object_mut() else {
                return Err(invalid(format!(
                    "spec.ports[{i}]: Invalid value: must be an object"
                )));
            };
            let port = p.get("port").and_then(Value::as_u64).unwrap_or(0);
            if !(1..=65535).contains(&port) {
                return Err(invalid(format!(
                    "spec.ports[{i}].port: Invalid value: {port}: must be between 1 and 65535, \
                     inclusive"
                )));
            }
            p.entry("protocol").or_insert_with(|| json!("TCP"));
            if !external {
                p.entry("targetPort").or_insert_with(|| json!(port));
            }
            let protocol = p.get("protocol").cloned();
            let requested = p
                .get("nodePort")
                .and_then(Value::as_u64)
                .filter(|n| *n != 0);
            if !node_ports_wanted {
                // The real server rejects an explicit nodePort here; clearing it is kinder to
                // tests that switch a Service back to ClusterIP.
                p.remove("nodePort");
                continue;
            }
            let np = match requested {
                Some(n) => {
                    if !(u64::from(*NODE_PORT_RANGE.start())..=u64::from(*NODE_PORT_RANGE.end()))
                        .contains(&n)
                    {
                        return Err(invalid(format!(
                            "spec.ports[{i}].nodePort: Invalid value: {n}: provided port is not \
                             in the valid range. The range of valid ports is 30000-32767"
                        )));
                    }
                    if used.contains(&n) {
                        return Err(invalid(format!(
                            "spec.ports[{i}].nodePort: Invalid value: {n}: provided port is \
                             already allocated"
                        )));
                    }
                    n
                }
                None => {
                    let kept = old_ports
                        .iter()
                        .find(|op| {
                            op.get("port").and_then(Value::as_u64) == Some(port)
                                && op.get("protocol").cloned().or(Some(json!("TCP"))) == protocol
                        })
                        .and_then(|op| op.get("nodePort").and_then(Value::as_u64));
                    match kept {
                        Some(n) if !used.contains(&n) => n,
                        _ => (u64::from(*NODE_PORT_RANGE.start())
                            ..=u64::from(*NODE_PORT_RANGE.end()))
                            .rev()
                            .find(|n| !used.contains(n) && !mine.contains(n))
                            .ok_or_else(|| {
                                invalid(format!(
                                    "spec.ports[{i}].nodePort: Internal error: range is full"
                                ))
                            })?,
                    }
                }
            };
            mine.insert(np);
            p.insert("nodePort".into(), json!(np));
        }
        root.entry("status")
            .or_insert_with(|| json!({ "loadBalancer": {} }));
        Ok(())
    }

    /// A free cluster IP of `family` ("IPv4" or "IPv6").
    fn allocate_cluster_ip(&self, family: &str) -> Result<String, ApiError> {
        let used: BTreeSet<String> = self
            .objects_of(Kind::Service)
            .flat_map(|s| {
                let ips = s.pointer("/spec/clusterIPs").and_then(Value::as_array);
                let ip = s.pointer("/spec/clusterIP");
                ips.into_iter()
                    .flatten()
                    .chain(ip)
                    .filter_map(Value::as_str)
            })
            .map(str::to_string)
            .collect();
        let full = || ApiError::new(500, "InternalError", "service IP range is full");
        if family == "IPv6" {
            // fd00:96::/108 (kubeadm's default is fd00:10:96::/112-like; any ULA does),
            // skipping the first ten addresses as for IPv4.
            let base = u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 11));
            return (base..base + (1 << 20))
                .map(|n| Ipv6Addr::from(n).to_string())
                .find(|ip| !used.contains(ip))
                .ok_or_else(full);
        }
        // 10.96.0.0/12, skipping .0 and the first ten addresses (10.96.0.1 is the kubernetes
        // Service, 10.96.0.10 kube-dns on real clusters).
        let base = u32::from(Ipv4Addr::new(10, 96, 0, 11));
        let end = u32::from(Ipv4Addr::new(10, 111, 255, 254));
        (base..=end)
            .map(|n| Ipv4Addr::from(n).to_string())
            .find(|ip| !used.contains(ip))
            .ok_or_else(full)
    }
}

/// "IPv4" or "IPv6" for an address, `None` for anything else.
fn family_of(ip: &str) -> Option<&'static str> {
    match ip.parse::<std::net::IpAddr>().ok()? {
        std::net::IpAddr::V4(_) => Some("IPv4"),
        std::net::IpAddr::V6(_) => Some("IPv6"),
    }
}

/// A Service's `ipFamilies` and `ipFamilyPolicy` after defaulting, as the real server
/// (single-stack IPv4 primary cluster with IPv6 enabled) does it: unset families follow the
/// requested cluster IP's family, else the policy (dual-stack policies get IPv4 and IPv6);
/// unset policy is `SingleStack`. Two families need a dual-stack policy; a family appears
/// once. Err: the `Invalid value` cause.
fn service_families(
    spec: &serde_json::Map<String, Value>,
) -> Result<(Vec<&'static str>, String), String> {
    let policy = spec.get("ipFamilyPolicy").and_then(Value::as_str);
    if let Some(p) = policy {
        if !["SingleStack", "PreferDualStack", "RequireDualStack"].contains(&p) {
            return Err(format!(
                "spec.ipFamilyPolicy: Unsupported value: \"{p}\": supported values: \
                 \"PreferDualStack\", \"RequireDualStack\", \"SingleStack\""
            ));
        }
    }
    let dual = matches!(policy, Some("PreferDualStack" | "RequireDualStack"));
    let mut families: Vec<&'static str> = Vec::new();
    match spec.get("ipFamilies").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => {
            for (i, f) in list.iter().enumerate() {
                let f = match f.as_str() {
                    Some("IPv4") => "IPv4",
                    Some("IPv6") => "IPv6",
                    _ => {
                        return Err(format!(
                            "spec.ipFamilies[{i}]: Unsupported value: {f}: supported values: \
                             \"IPv4\", \"IPv6\""
                        ))
                    }
                };
                if families.contains(&f) {
                    return Err(format!("spec.ipFamilies[{i}]: Duplicate value: \"{f}\""));
                }
                families.push(f);
            }
        }
        _ => {
            let requested = spec.get("clusterIP").and_then(Value::as_str);
            let first = requested.and_then(family_of).unwrap_or("IPv4");
            families.push(first);
            if dual {
                families.push(if first == "IPv4" { "IPv6" } else { "IPv4" });
            }
        }
    }
    if families.len() > 1 && !dual {
        return Err(format!(
            "spec.ipFamilyPolicy: Invalid value: \"{}\": must be RequireDualStack or \
             PreferDualStack when multiple 'ipFamilies' are specified",
            policy.unwrap_or("SingleStack")
        ));
    }
    Ok((families, policy.unwrap_or("SingleStack").to_string()))
}

fn conflict(kind: Kind, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            qualified(kind)
        ),
    )
    .with_details(kind, name)
}

// ---------------------------------------------------------------------------------------------
// Patches

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The merge key of a list field in a strategic merge patch, for the lists of the kinds served
/// here that are not atomic.
fn merge_key(kind: Kind, field: &str) -> Option<&'static str> {
    match (kind, field) {
        (Kind::Service, "ports") => Some("port"),
        (Kind::Node, "addresses") | (Kind::Node, "conditions") => Some("type"),
        (_, "ownerReferences") => Some("uid"),
        _ => None,
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// A strategic merge patch, for the directives kubectl sends: maps merge, `null` deletes,
/// `$patch: replace|delete`, lists with a merge key merge by it, other lists are replaced;
/// `$setElementOrder`, `$retainKeys` and `$deleteFromPrimitiveList` are ignored.
fn strategic_merge(kind: Kind, target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *target = json!({});
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v, merge_key(kind, k)) {
            (Some(Value::Array(ta)), Value::Array(pa), Some(key)) => {
                for pe in pa {
                    let kv = pe.get(key);
                    let pos = kv.and_then(|kv| ta.iter().position(|te| te.get(key) == Some(kv)));
                    let delete = pe.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            ta.remove(i);
                        }
                        (Some(i), false) => strategic_merge(kind, &mut ta[i], pe),
                        (None, true) => {}
                        (None, false) => ta.push(strip_directives(pe)),
                    }
                }
            }
            (Some(tv @ Value::Object(_)), Value::Object(_), _) => strategic_merge(kind, tv, v),
            _ => {
                t.insert(k.clone(), strip_directives(v));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub status: u16,
    /// Whether it was a watch (its status is the one of the response head).
    pub watch: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutMode {
    Abort,
    Close,
}

struct Faults {
    fail_remaining: u32,
    fail_code: u16,
}

struct Shared {
    store: Mutex<Store>,
    rng: Rng,
    /// Latest revision, to wake watchers.
    rv_tx: watch::Sender<u64>,
    /// Generation and mode of the last cut of the open watches.
    cut_tx: watch::Sender<(u64, CutMode)>,
    /// Serving epoch: bumped by stop(); accept loops and connections end on a change.
    stop_tx: watch::Sender<u64>,
    faults: Mutex<Faults>,
    delay_ms: AtomicU64,
    bookmark_ms: AtomicU64,
    open_watches: AtomicUsize,
    open_conns: AtomicUsize,
    total_requests: AtomicU64,
    requests: Mutex<VecDeque<RequestRecord>>,
    addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Runs a write and wakes the watchers.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Store, &Rng) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut store = self.store();
        let before = store.rv;
        let out = f(&mut store, &self.rng);
        if store.rv != before {
            self.rv_tx.send_replace(store.rv);
        }
        out
    }

    fn take_fault(&self) -> Option<u16> {
        let mut f = lock(&self.faults);
        if f.fail_remaining > 0 {
            f.fail_remaining -= 1;
            Some(f.fail_code)
        } else {
            None
        }
    }

    fn log(&self, rec: RequestRecord) {
        let mut log = lock(&self.requests);
        if log.len() >= MAX_REQUEST_LOG {
            log.pop_front();
        }
        log.push_back(rec);
    }
}

struct CountGuard<'a>(&'a AtomicUsize);

impl<'a> CountGuard<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        CountGuard(c)
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

type RespBody = BoxBody<Bytes, io::Error>;

/// A response body fed by a channel: the watch stream. An `Err` item aborts the response
/// (hyper closes the connection without the final chunk).
struct ChannelBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(code: u16, v: &Value) -> Response<RespBody> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<RespBody> {
    json_response(e.code, &e.status())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (percent_decode(k), percent_decode(v)),
                    None => (percent_decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true") | Some("1"))
    }

    fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, v)| k == "dryRun" && v == "All")
    }
}

/// What a resource URL names.
#[derive(Debug)]
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    watch_path: bool,
}

fn parse_target(segs: &[&str]) -> Option<Target> {
    let (group, rest) = match segs {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery.k8s.io", rest),
        _ => return None,
    };
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let s = |x: &&str| Some(x.to_string());
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if !group.is_empty() || !["status", "finalize"].contains(plural) =>
        {
            (
                s(ns),
                *plural,
                tail.first().and_then(s),
                tail.get(1).and_then(s),
            )
        }
        [plural, tail @ ..] => (
            None,
            *plural,
            tail.first().and_then(s),
            tail.get(1).and_then(s),
        ),
        [] => return None,
    };
    let kind = Kind::from_plural(group, plural)?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    if rest.len() > 5 {
        return None;
    }
    Some(Target {
        kind,
        namespace,
        name,
        subresource: sub,
        watch_path,
    })
}

fn resource_list(group_version: &str, kinds: &[Kind]) -> Value {
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut resources = Vec::new();
    for k in kinds {
        let i = k.info();
        let mut r = json!({
            "name": i.plural,
            "singularName": i.singular,
            "namespaced": i.namespaced,
            "kind": i.kind,
            "verbs": verbs,
        });
        if !i.short_names.is_empty() {
            r["shortNames"] = json!(i.short_names);
        }
        if !i.categories.is_empty() {
            r["categories"] = json!(i.categories);
        }
        resources.push(r);
        if matches!(k, Kind::Service | Kind::Node | Kind::Namespace) {
            resources.push(json!({
                "name": format!("{}/status", i.plural),
                "singularName": "",
                "namespaced": i.namespaced,
                "kind": i.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

/// A minimal OpenAPI v3 document for a group-version: only what kubectl reads to decide that
/// the server validates fields itself (`fieldValidation` on each kind's PATCH and POST), so
/// that it sends objects without client-side schema validation. No schemas.
fn openapi_v3(kinds: &[Kind]) -> Value {
    let mut paths = Map::new();
    for k in kinds {
        let i = k.info();
        let (group, version) = match i.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", i.api_version),
        };
        let prefix = if group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}", i.api_version)
        };
        let collection = if i.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", i.plural)
        } else {
            format!("{prefix}/{}", i.plural)
        };
        let op = json!({
            "x-kubernetes-group-version-kind": { "group": group, "version": version, "kind": i.kind },
            "parameters": [
                { "name": "fieldValidation", "in": "query", "schema": { "type": "string" } },
                { "name": "dryRun", "in": "query", "schema": { "type": "string" } },
                { "name": "fieldManager", "in": "query", "schema": { "type": "string" } },
            ],
            "responses": { "200": { "description": "OK" } },
        });
        paths.insert(collection.clone(), json!({ "post": op }));
        paths.insert(
            format!("{collection}/{{name}}"),
            json!({ "patch": op, "put": op }),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": SERVER_GIT_VERSION },
        "paths": paths,
        "components": { "schemas": {} },
    })
}

fn discovery_group() -> Value {
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "discovery.k8s.io",
        "versions": [{ "groupVersion": "discovery.k8s.io/v1", "version": "v1" }],
        "preferredVersion": { "groupVersion": "discovery.k8s.io/v1", "version": "v1" },
    })
}

fn discovery(segs: &[&str], addr: SocketAddr) -> Option<Value> {
    Some(match segs {
        ["version"] => json!({
            "major": SERVER_VERSION.0,
            "minor": SERVER_VERSION.1,
            "gitVersion": SERVER_GIT_VERSION,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }),
        ["api"] => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                { "clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string() }
            ],
        }),
        ["api", "v1"] => resource_list("v1", &[Kind::Namespace, Kind::Node, Kind::Service]),
        ["apis"] => {
            let mut g = discovery_group();
            if let Some(m) = g.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [g] })
        }
        ["apis", "discovery.k8s.io"] => discovery_group(),
        ["apis", "discovery.k8s.io", "v1"] => {
            resource_list("discovery.k8s.io/v1", &[Kind::EndpointSlice])
        }
        ["openapi", "v3"] => json!({
            "paths": {
                "api/v1": { "serverRelativeURL": "/openapi/v3/api/v1?hash=np1" },
                "apis/discovery.k8s.io/v1": {
                    "serverRelativeURL": "/openapi/v3/apis/discovery.k8s.io/v1?hash=np1"
                },
            }
        }),
        ["openapi", "v3", "api", "v1"] => openapi_v3(&[Kind::Namespace, Kind::Node, Kind::Service]),
        ["openapi", "v3", "apis", "discovery.k8s.io", "v1"] => openapi_v3(&[Kind::EndpointSlice]),
        _ => return None,
    })
}

/// Whether the client asked for a `meta.k8s.io` Table (kubectl's human-readable output).
fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn age(obj: &Value) -> String {
    // Only the creation time is known; the age column is approximate, as in kubectl.
    let Some(ts) = meta_str(obj, "creationTimestamp") else {
        return "<unknown>".into();
    };
    let parse = |s: &str| -> Option<i64> {
        let (date, time) = s.trim_end_matches('Z').split_once('T')?;
        let d: Vec<i64> = date
            .split('-')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let t: Vec<i64> = time
            .split(':')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some((era * 146_097 + doe - 719_468) * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match parse(ts) {
        Some(t) => {
            let s = (now - t).max(0);
            match s {
                0..=119 => format!("{s}s"),
                120..=7199 => format!("{}m", s / 60),
                7200..=172_799 => format!("{}h", s / 3600),
                _ => format!("{}d", s / 86_400),
            }
        }
        None => "<unknown>".into(),
    }
}

fn table_columns(kind: Kind) -> Vec<(&'static str, &'static str)> {
    match kind {
        Kind::Service => vec![
            ("Name", "string"),
            ("Type", "string"),
            ("Cluster-IP", "string"),
            ("External-IP", "string"),
            ("Port(s)", "string"),
            ("Age", "string"),
        ],
        Kind::EndpointSlice => vec![
            ("Name", "string"),
            ("AddressType", "string"),
            ("Ports", "string"),
            ("Endpoints", "string"),
            ("Age", "string"),
        ],
        Kind::Node => vec![
            ("Name", "string"),
            ("Status", "string"),
            ("Roles", "string"),
            ("Age", "string"),
            ("Version", "string"),
        ],
        Kind::Namespace => vec![("Name", "string"), ("Status", "string"), ("Age", "string")],
    }
}

fn table_cells(kind: Kind, o: &Value) -> Vec<Value> {
    let s = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let name = obj_name(o).to_string();
    match kind {
        Kind::Service => {
            let ports: Vec<String> = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    let port = p.get("port").and_then(Value::as_u64).unwrap_or(0);
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_u64) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect();
            let ext = if s("/spec/type") == "ExternalName" {
                s("/spec/externalName")
            } else {
                "<none>".into()
            };
            let cip = match s("/spec/clusterIP") {
                ip if ip.is_empty() => "<none>".to_string(),
                ip => ip,
            };
            vec![
                json!(name),
                json!(s("/spec/type")),
                json!(cip),
                json!(ext),
                json!(if ports.is_empty() {
                    "<none>".into()
                } else {
                    ports.join(",")
                }),
                json!(age(o)),
            ]
        }
        Kind::EndpointSlice => {
            let ports: Vec<String> = o
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("port").and_then(Value::as_u64))
                .map(|p| p.to_string())
                .collect();
            let addrs: Vec<String> = o
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| e.pointer("/addresses/0").and_then(Value::as_str))
                .map(str::to_string)
                .collect();
            vec![
                json!(name),
                json!(o.get("addressType").and_then(Value::as_str).unwrap_or("")),
                json!(if ports.is_empty() {
                    "<unset>".into()
                } else {
                    ports.join(",")
                }),
                json!(if addrs.is_empty() {
                    "<unset>".into()
                } else {
                    addrs.join(",")
                }),
                json!(age(o)),
            ]
        }
        Kind::Node => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                .and_then(|c| c.get("status").and_then(Value::as_str))
                == Some("True");
            vec![
                json!(name),
                json!(if ready { "Ready" } else { "NotReady" }),
                json!("<none>"),
                json!(age(o)),
                json!(s("/status/nodeInfo/kubeletVersion")),
            ]
        }
        Kind::Namespace => vec![json!(name), json!(s("/status/phase")), json!(age(o))],
    }
}

fn table(kind: Kind, items: &[Value], list_meta: Value) -> Value {
    let columns: Vec<Value> = table_columns(kind)
        .into_iter()
        .enumerate()
        .map(|(i, (name, ty))| {
            json!({
                "name": name, "type": ty, "format": if i == 0 { "name" } else { "" },
                "description": "", "priority": 0,
            })
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            json!({
                "cells": table_cells(kind, o),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                },
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

async fn read_body(req: Request<Incoming>) -> Result<(String, Bytes), ApiError> {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, "RequestEntityTooLarge", e.to_string()))?
        .to_bytes();
    Ok((ct, body))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the request body: {e}")))
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    shared.total_requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let delay = shared.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (resp, watch) = match shared.take_fault() {
        Some(code) => (
            error_response(&ApiError::new(
                code,
                if code == 500 {
                    "InternalError"
                } else {
                    "ServiceUnavailable"
                },
                format!("Internal error occurred: injected fault (HTTP {code})"),
            )),
            false,
        ),
        None => route(&shared, req).await,
    };
    shared.log(RequestRecord {
        method: method.to_string(),
        uri,
        status: resp.status().as_u16(),
        watch,
    });
    Ok(resp)
}

/// Answers a request; the flag tells whether it became a watch stream.
async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> (Response<RespBody>, bool) {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let query = Query::parse(req.uri().query());
    if req.method() == Method::GET {
        if let Some(doc) = discovery(&segs, shared.addr) {
            return (json_response(200, &doc), false);
        }
        if matches!(segs.as_slice(), ["healthz"] | ["livez"] | ["readyz"]) {
            let mut r = Response::new(full("ok"));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return (r, false);
        }
    }
    let Some(target) = parse_target(&segs) else {
        let e = ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        return (error_response(&e), false);
    };
    let table = wants_table(&req);
    let result = match (req.method().clone(), &target.name) {
        (Method::GET, _) if target.watch_path || query.flag("watch") => {
            return match serve_watch(shared, &target, &query, table) {
                Ok(r) => (r, true),
                Err(e) => (error_response(&e), false),
            };
        }
        (Method::GET, None) => serve_list(shared, &target, &query, table).await,
        (Method::GET, Some(name)) => {
            let store = shared.store();
            let key = (
                target.kind,
                target.namespace.clone().unwrap_or_default(),
                name.clone(),
            );
            match store.objects.get(&key) {
                Some(o) if table => Ok((
                    200,
                    self::table(
                        target.kind,
                        std::slice::from_ref(o),
                        json!({ "resourceVersion": store.rv.to_string() }),
                    ),
                )),
                Some(o) => Ok((200, o.clone())),
                None => Err(ApiError::not_found(target.kind, name)),
            }
        }
        (Method::POST, None) => match read_body(req).await {
            Ok((_, body)) => parse_json(&body).and_then(|obj| {
                shared
                    .write(|s, rng| {
                        s.create(
                            rng,
                            target.kind,
                            target.namespace.as_deref(),
                            obj,
                            query.dry_run(),
                        )
                    })
                    .map(|o| (201, o))
            }),
            Err(e) => Err(e),
        },
        (Method::PUT, Some(name)) => match read_body(req).await {
            Ok((_, body)) => parse_json(&body).and_then(|obj| {
                let obj = if target.subresource.as_deref() == Some("status") {
                    status_update(shared, &target, name, obj)?
                } else {
                    obj
                };
                shared
                    .write(|s, _| {
                        s.update(
                            target.kind,
                            target.namespace.as_deref(),
                            Some(name),
                            obj,
                            query.dry_run(),
                        )
                    })
                    .map(|o| (200, o))
            }),
            Err(e) => Err(e),
        },
        (Method::PATCH, Some(name)) => match read_body(req).await {
            Ok((ct, body)) => serve_patch(shared, &target, name, &ct, &body, &query),
            Err(e) => Err(e),
        },
        (Method::DELETE, Some(name)) => match read_body(req).await {
            Ok((_, body)) => {
                let opts: Value = if body.iter().all(u8::is_ascii_whitespace) {
                    json!({})
                } else {
                    parse_json(&body).unwrap_or(json!({}))
                };
                let pre = (
                    opts.pointer("/preconditions/resourceVersion")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    opts.pointer("/preconditions/uid")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                );
                let dry = query.dry_run()
                    || opts
                        .get("dryRun")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|v| v == "All"));
                shared
                    .write(|s, _| {
                        s.delete(
                            target.kind,
                            target.namespace.as_deref().unwrap_or(""),
                            name,
                            pre,
                            dry,
                        )
                    })
                    .map(|o| (200, o))
            }
            Err(e) => Err(e),
        },
        (m, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({m})"),
        )),
    };
    match result {
        Ok((code, v)) => (json_response(code, &v), false),
        Err(e) => (error_response(&e), false),
    }
}

/// PUT on `/status`: the stored object with the status of the body.
fn status_update(
    shared: &Shared,
    target: &Target,
    name: &str,
    obj: Value,
) -> Result<Value, ApiError> {
    let store = shared.store();
    let key = (
        target.kind,
        target.namespace.clone().unwrap_or_default(),
        name.to_string(),
    );
    let mut cur = store
        .objects
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(target.kind, name))?;
    cur["status"] = obj.get("status").cloned().unwrap_or(json!({}));
    if let Some(rv) = obj_rv(&obj) {
        set_rv_str(&mut cur, rv);
    }
    Ok(cur)
}

fn set_rv_str(obj: &mut Value, rv: &str) {
    meta_mut(obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
}

fn serve_patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    body: &[u8],
    query: &Query,
) -> Result<(u16, Value), ApiError> {
    let kind = target.kind;
    let ns = target.namespace.as_deref();
    let patch: Value = match content_type {
        "application/apply-patch+yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            parse_json(body)?
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other})"),
            ))
        }
    };
    let status_only = target.subresource.as_deref() == Some("status");
    shared.write(|s, rng| {
        let key = (kind, ns.unwrap_or("").to_string(), name.to_string());
        let key = if kind.namespaced() {
            key
        } else {
            (kind, String::new(), name.to_string())
        };
        let Some(cur) = s.objects.get(&key).cloned() else {
            if content_type == "application/apply-patch+yaml" {
                let mut obj = patch.clone();
                meta_mut(&mut obj).insert("name".into(), json!(name));
                return s
                    .create(rng, kind, ns, obj, query.dry_run())
                    .map(|o| (201, o));
            }
            return Err(ApiError::not_found(kind, name));
        };
        let mut next = cur.clone();
        let patch = if status_only {
            json!({ "status": patch.get("status").cloned().unwrap_or(Value::Null) })
        } else {
            patch.clone()
        };
        match content_type {
            "application/strategic-merge-patch+json" => strategic_merge(kind, &mut next, &patch),
            _ => merge_patch(&mut next, &patch),
        }
        s.update(kind, ns, Some(name), next, query.dry_run())
            .map(|o| (200, o))
    })
}

async fn serve_list(
    shared: &Arc<Shared>,
    target: &Target,
    query: &Query,
    as_table: bool,
) -> Result<(u16, Value), ApiError> {
    let filter = Filter {
        kind: target.kind,
        namespace: target.namespace.clone(),
        name: None,
        selector: Selector::parse(query.get("labelSelector"), query.get("fieldSelector"))?,
        as_table: false,
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let rv_param = query.get("resourceVersion").filter(|s| !s.is_empty());
    let exact = query.get("resourceVersionMatch") == Some("Exact");
    let want_rv = match rv_param {
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))?,
        ),
        None => None,
    };
    if let Some(n) = want_rv.filter(|n| *n > 0) {
        // A revision from the future: the real server waits up to 3 s for it, then 504s.
        let mut rv_rx = shared.rv_tx.subscribe();
        let reached = tokio::time::timeout(Duration::from_secs(3), rv_rx.wait_for(|rv| *rv >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        if !reached {
            let cur = shared.store().rv;
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Timeout: Too large resource version: {n}, current: {cur}"),
            ));
        }
    }

    let mut store = shared.store();
    let (rv, items, offset, snap_id) =
        if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
            let parsed = token
                .strip_prefix("np1-")
                .and_then(|t| t.split_once('-'))
                .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            let Some((id, off)) = parsed else {
                return Err(ApiError::bad_request(format!(
                    "continue key is not valid: {token}"
                )));
            };
            let Some(snap) = store.snapshots.iter().find(|s| s.id == id) else {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter, or use the \
                 continue token in this response to retrieve the remainder of the results. \
                 Continuing with the provided token results in an inconsistent list - objects \
                 that were created, modified, or deleted between the time the first chunk was \
                 returned and now may show up in the list.",
                ));
            };
            (snap.rv, snap.items.clone(), off, Some(id))
        } else {
            let (rv, all) = match want_rv {
                Some(n) if exact && n > 0 => {
                    if n < store.oldest {
                        return Err(store.too_old(n));
                    }
                    (n, store.state_at(target.kind, n))
                }
                _ => (
                    store.rv,
                    store.objects_of(target.kind).cloned().collect::<Vec<_>>(),
                ),
            };
            let items: Vec<Value> = all.into_iter().filter(|o| filter.matches(o)).collect();
            (rv, Arc::new(items), 0, None)
        };
    let end = match limit {
        Some(l) => (offset + l).min(items.len()),
        None => items.len(),
    };
    let page: Vec<Value> = items.get(offset..end).unwrap_or(&[]).to_vec();
    let mut list_meta = json!({ "resourceVersion": rv.to_string() });
    if end < items.len() {
        let id = match snap_id {
            Some(id) => id,
            None => {
                store.next_snapshot += 1;
                let id = store.next_snapshot;
                store.snapshots.push_back(Snapshot {
                    id,
                    rv,
                    items: items.clone(),
                });
                while store.snapshots.len() > MAX_SNAPSHOTS {
                    store.snapshots.pop_front();
                }
                id
            }
        };
        list_meta["continue"] = json!(format!("np1-{id}-{end}"));
        list_meta["remainingItemCount"] = json!(items.len() - end);
    }
    drop(store);
    if as_table {
        return Ok((200, table(target.kind, &page, list_meta)));
    }
    let info = target.kind.info();
    Ok((
        200,
        json!({
            "kind": info.list_kind,
            "apiVersion": info.api_version,
            "metadata": list_meta,
            "items": page.iter().map(list_item).collect::<Vec<_>>(),
        }),
    ))
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": ty, "object": object })).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        &json!({ "kind": kind.info().kind, "apiVersion": kind.info().api_version, "metadata": metadata }),
    )
}

/// The events a watcher with `filter` sees for `e`.
fn translate(filter: &Filter, e: &Event) -> Option<Bytes> {
    let now = filter.matches(&e.object);
    let before = e.prev.as_ref().is_some_and(|p| filter.matches(p));
    match e.ty {
        EventType::Added => now.then(|| filter.line("ADDED", &e.object)),
        EventType::Deleted => before.then(|| filter.line("DELETED", &e.object)),
        EventType::Modified => match (before, now) {
            (true, true) => Some(filter.line("MODIFIED", &e.object)),
            (false, true) => Some(filter.line("ADDED", &e.object)),
            (true, false) => {
                // Leaving the selection: the previous state, stamped with the new revision.
                let mut gone = e.prev.clone().unwrap_or_default();
                set_rv(&mut gone, e.rv);
                Some(filter.line("DELETED", &gone))
            }
            (false, false) => None,
        },
    }
}

enum Start {
    /// Synthetic ADDED events for the current state, then changes (`sendInitialEvents` adds
    /// the initial-events-end bookmark).
    Initial { end_bookmark: bool },
    /// Changes after this revision.
    After(u64),
}

fn serve_watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &Query,
    as_table: bool,
) -> Result<Response<RespBody>, ApiError> {
    let filter = Filter {
        kind: target.kind,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        selector: Selector::parse(query.get("labelSelector"), query.get("fieldSelector"))?,
        as_table,
    };
    let rv = query.get("resourceVersion").filter(|s| !s.is_empty());
    let send_initial = query.get("sendInitialEvents");
    let start = match (rv, send_initial) {
        (_, Some("true")) => Start::Initial { end_bookmark: true },
        (None, Some("false")) | (Some("0"), Some("false")) => Start::After(shared.store().rv),
        (None, _) | (Some("0"), _) => Start::Initial {
            end_bookmark: false,
        },
        (Some(s), _) => Start::After(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))?,
        ),
    };
    let bookmarks = query.flag("allowWatchBookmarks");
    let deadline = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(watch_task(
        shared.clone(),
        filter,
        start,
        bookmarks,
        deadline,
        tx,
    ));
    let mut r = Response::new(ChannelBody(rx).boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}

async fn watch_task(
    shared: Arc<Shared>,
    filter: Filter,
    start: Start,
    bookmarks: bool,
    deadline: Option<tokio::time::Instant>,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
) {
    let _open = CountGuard::new(&shared.open_watches);
    let mut rv_rx = shared.rv_tx.subscribe();
    let mut cut_rx = shared.cut_tx.subscribe();
    let kind = filter.kind;
    let mut cursor = match start {
        Start::After(n) => n,
        Start::Initial { end_bookmark } => {
            rv_rx.borrow_and_update();
            let (rv, lines) = {
                let store = shared.store();
                let lines: Vec<Bytes> = store
                    .objects_of(kind)
                    .filter(|o| filter.matches(o))
                    .map(|o| filter.line("ADDED", o))
                    .collect();
                (store.rv, lines)
            };
            for l in lines {
                if tx.send(Ok(l)).await.is_err() {
                    return;
                }
            }
            if end_bookmark && tx.send(Ok(bookmark(kind, rv, true))).await.is_err() {
                return;
            }
            rv
        }
    };
    let interval = Duration::from_millis(shared.bookmark_ms.load(Ordering::Relaxed).max(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let deadline = deadline.unwrap_or(far);
    loop {
        rv_rx.borrow_and_update();
        let batch: Result<Vec<Bytes>, ApiError> = {
            let store = shared.store();
            if cursor < store.oldest {
                Err(store.too_old(cursor))
            } else {
                let from = store.history.partition_point(|e| e.rv <= cursor);
                let lines = store
                    .history
                    .range(from..)
                    .filter(|e| e.kind == kind)
                    .filter_map(|e| translate(&filter, e))
                    .collect();
                cursor = cursor.max(store.rv);
                Ok(lines)
            }
        };
        match batch {
            Ok(lines) => {
                for l in lines {
                    if tx.send(Ok(l)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Ok(event_line("ERROR", &e.status()))).await;
                return;
            }
        }
        // Biased: a cut wins over events that arrive at the same time, so nothing written after
        // cut_watches() reaches a stream that was open before it.
        tokio::select! {
            biased;
            r = cut_rx.changed() => {
                if r.is_err() { return }
                let mode = cut_rx.borrow_and_update().1;
                if mode == CutMode::Abort {
                    let _ = tx.send(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "watch cut (fault injection)"))).await;
                }
                return;
            }
            r = rv_rx.changed() => if r.is_err() { return },
            _ = tick.tick(), if bookmarks => {
                if tx.send(Ok(bookmark(kind, cursor, false))).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tx.closed() => return,
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    done: std::sync::mpsc::Sender<()>,
) {
    let mut stop_rx = shared.stop_tx.subscribe();
    loop {
        tokio::select! {
            _ = stop_rx.changed() => break,
            r = listener.accept() => {
                let Ok((stream, _)) = r else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared2 = shared.clone();
                let mut stop2 = stop_rx.clone();
                shared.open_conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc_shared = shared2.clone();
                    let svc = hyper::service::service_fn(move |req| handle(svc_shared.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop2.changed() => {}
                    }
                    shared2.open_conns.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }
    drop(listener);
    let _ = done.send(());
}

// ---------------------------------------------------------------------------------------------
// Public handle

/// Settings for [`ApiServer::start_with`].
#[derive(Clone, Debug)]
pub struct ApiServerConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Events kept for watch replay (the real server's watch cache keeps ~100 per resource,
    /// etcd keeps 5 minutes).
    pub history_limit: usize,
    /// Period of BOOKMARK events on watches that allow them (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// Create the `default`, `kube-system` and `kube-public` Namespaces at start.
    pub seed_namespaces: bool,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(1),
            seed_namespaces: true,
        }
    }
}

/// A running test API server. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    /// While serving: the signal the accept loop sends when it has closed the listener.
    serving: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 and a free port, with the default settings.
    pub fn start() -> anyhow::Result<ApiServer> {
        Self::start_with(ApiServerConfig::default())
    }

    pub fn start_with(config: ApiServerConfig) -> anyhow::Result<ApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("np-apiserver")
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(config.listen)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_limit: config.history_limit.max(1),
                oldest: 1,
                snapshots: VecDeque::new(),
                next_snapshot: 0,
            }),
            rng: Rng::new(),
            rv_tx: watch::Sender::new(1),
            cut_tx: watch::Sender::new((0, CutMode::Abort)),
            stop_tx: watch::Sender::new(0),
            faults: Mutex::new(Faults {
                fail_remaining: 0,
                fail_code: 500,
            }),
            delay_ms: AtomicU64::new(0),
            bookmark_ms: AtomicU64::new(config.bookmark_interval.as_millis() as u64),
            open_watches: AtomicUsize::new(0),
            open_conns: AtomicUsize::new(0),
            total_requests: AtomicU64::new(0),
            requests: Mutex::new(VecDeque::new()),
            addr,
        });
        let server = ApiServer {
            shared,
            runtime: Some(runtime),
            serving: Mutex::new(None),
        };
        if config.seed_namespaces {
            for ns in ["default", "kube-system", "kube-public"] {
                server
                    .create_value(json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }))
                    .map_err(|e| anyhow::anyhow!("seeding namespace {ns}: {e}"))?;
            }
        }
        server.serve(std_listener)?;
        Ok(server)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("runtime lives as long as the server")
    }

    fn serve(&self, std_listener: std::net::TcpListener) -> anyhow::Result<()> {
        std_listener.set_nonblocking(true)?;
        let listener = {
            let _guard = self.rt().enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // Subscribe before returning so that a stop() right after start() is seen.
        self.rt()
            .spawn(accept_loop(self.shared.clone(), listener, done_tx));
        *lock(&self.serving) = Some(done_rx);
        Ok(())
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig (YAML) for this server: no authentication, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: nodeport-test\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: nodeport-test\n  context:\n    cluster: nodeport-test\n    user: nodeport-test\n    namespace: default\n\
             current-context: nodeport-test\n\
             users:\n\
             - name: nodeport-test\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        )
    }

    /// Writes [`ApiServer::kubeconfig`] to `path`, for `kubectl --kubeconfig` and kube-rs's
    /// `Config::from_custom_kubeconfig`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    // -- objects -------------------------------------------------------------------------------

    /// The latest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Creates an object (any served kind; `kind` and `apiVersion` must be set). A namespaced
    /// object without a namespace goes to `default`.
    pub fn create_value(&self, obj: Value) -> Result<Value, ApiError> {
        let kind = kind_of_value(&obj)?;
        self.shared
            .write(|s, rng| s.create(rng, kind, None, obj, false))
    }

    /// Replaces an object. When `metadata.resourceVersion` is set it must be the stored one
    /// (409 Conflict otherwise); unset means unconditional.
    pub fn update_value(&self, obj: Value) -> Result<Value, ApiError> {
        let kind = kind_of_value(&obj)?;
        self.shared
            .write(|s, _| s.update(kind, None, None, obj, false))
    }

    /// Creates the object, or updates it (unconditionally) when it exists.
    pub fn apply_value(&self, obj: Value) -> Result<Value, ApiError> {
        let kind = kind_of_value(&obj)?;
        self.shared.write(|s, rng| {
            let mut probe = obj.clone();
            s.normalize(kind, None, &mut probe)?;
            if s.objects.contains_key(&key_of(kind, &probe)) {
                let mut obj = obj;
                meta_mut(&mut obj).remove("resourceVersion");
                s.update(kind, None, None, obj, false)
            } else {
                s.create(rng, kind, None, obj, false)
            }
        })
    }

    /// Deletes the object with this kind, namespace and name.
    pub fn delete_value(&self, obj: &Value) -> Result<Value, ApiError> {
        let kind = kind_of_value(obj)?;
        let ns = meta_str(obj, "namespace").unwrap_or("default").to_string();
        let name = obj_name(obj).to_string();
        self.shared
            .write(|s, _| s.delete(kind, &ns, &name, (None, None), false))
    }

    /// A stored object.
    pub fn get_value(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        self.shared
            .store()
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Every stored object of `kind`, ordered by namespace and name.
    pub fn list_values(&self, kind: Kind) -> Vec<Value> {
        self.shared.store().objects_of(kind).cloned().collect()
    }

    /// Typed [`ApiServer::create_value`].
    pub fn create<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(
        &self,
        obj: &K,
    ) -> Result<K, ApiError> {
        Kind::of::<K>()?;
        from_value(self.create_value(to_value(obj)?)?)
    }

    /// Typed [`ApiServer::update_value`].
    pub fn update<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(
        &self,
        obj: &K,
    ) -> Result<K, ApiError> {
        Kind::of::<K>()?;
        from_value(self.update_value(to_value(obj)?)?)
    }

    /// Typed [`ApiServer::apply_value`] (create or update).
    pub fn apply<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(
        &self,
        obj: &K,
    ) -> Result<K, ApiError> {
        Kind::of::<K>()?;
        from_value(self.apply_value(to_value(obj)?)?)
    }

    /// Deletes the object named by `obj`'s namespace and name; returns its final state.
    pub fn delete<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(
        &self,
        obj: &K,
    ) -> Result<K, ApiError> {
        Kind::of::<K>()?;
        from_value(self.delete_value(&to_value(obj)?)?)
    }

    /// Deletes by namespace (ignored for cluster-scoped kinds; `None` is `default`) and name.
    pub fn delete_named<K: k8s_openapi::Resource + Serialize + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<K, ApiError> {
        let kind = Kind::of::<K>()?;
        let ns = namespace.unwrap_or("default").to_string();
        from_value(
            self.shared
                .write(|s, _| s.delete(kind, &ns, name, (None, None), false))?,
        )
    }

    /// A stored object, typed.
    pub fn get<K: k8s_openapi::Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let kind = Kind::of::<K>().ok()?;
        self.get_value(kind, namespace, name)
            .and_then(|v| from_value(v).ok())
    }

    /// Every stored object of type `K`, ordered by namespace and name.
    pub fn list<K: k8s_openapi::Resource + DeserializeOwned>(&self) -> Vec<K> {
        let Ok(kind) = Kind::of::<K>() else {
            return Vec::new();
        };
        self.list_values(kind)
            .into_iter()
            .filter_map(|v| from_value(v).ok())
            .collect()
    }

    /// Every stored object and the revision, as JSON (for `np-apiserver --state`).
    pub fn export_state(&self) -> Value {
        let store = self.shared.store();
        json!({
            "resourceVersion": store.rv.to_string(),
            "objects": store.objects.values().cloned().collect::<Vec<_>>(),
        })
    }

    /// Replaces every object with those of an [`ApiServer::export_state`] document. The
    /// revision becomes at least the saved one and the history is dropped (as after a
    /// compaction); open watches end with 410 if they are behind.
    pub fn import_state(&self, state: &Value) -> Result<(), ApiError> {
        let saved_rv = state
            .get("resourceVersion")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let mut objects = BTreeMap::new();
        for o in state
            .get("objects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = kind_of_value(o)?;
            objects.insert(key_of(kind, o), o.clone());
        }
        let mut store = self.shared.store();
        store.objects = objects;
        store.rv = store.rv.max(saved_rv) + 1;
        store.compact();
        self.shared.rv_tx.send_replace(store.rv);
        Ok(())
    }

    // -- faults --------------------------------------------------------------------------------

    /// Aborts every open watch stream now (the connection is closed mid-response, as when a
    /// load balancer or the server dies). New watches work as usual.
    pub fn cut_watches(&self) {
        self.shared.cut_tx.send_modify(|(gen, mode)| {
            *gen += 1;
            *mode = CutMode::Abort;
        });
    }

    /// Ends every open watch stream cleanly, as the real server does at `timeoutSeconds`.
    pub fn close_watches(&self) {
        self.shared.cut_tx.send_modify(|(gen, mode)| {
            *gen += 1;
            *mode = CutMode::Close;
        });
    }

    /// The next `k` requests (of any kind) get HTTP 500 with an InternalError Status.
    pub fn fail_next(&self, k: u32) {
        self.fail_next_with(k, 500);
    }

    /// The next `k` requests get `code` (e.g. 503) with a Status body.
    pub fn fail_next_with(&self, k: u32, code: u16) {
        let mut f = lock(&self.shared.faults);
        f.fail_remaining = k;
        f.fail_code = code;
    }

    /// Requests still to fail from [`ApiServer::fail_next`].
    pub fn pending_failures(&self) -> u32 {
        lock(&self.shared.faults).fail_remaining
    }

    /// Delays every response (watch heads included) by `d`; zero removes the delay.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Period of BOOKMARK events for watches started from now on.
    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared
            .bookmark_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Drops the event history: a watch from any revision older than the current one gets a
    /// 410 Expired ERROR event, an `Exact` list or a `continue` from before gets HTTP 410.
    /// Returns the revision the history now starts at.
    pub fn compact(&self) -> u64 {
        self.shared.store().compact()
    }

    /// Stops serving: closes the listening socket (connections are refused) and every open
    /// connection, watches included. The objects are kept. Waits (up to 5 s) until done.
    pub fn stop(&self) {
        let Some(done) = lock(&self.serving).take() else {
            return;
        };
        self.shared.stop_tx.send_modify(|e| *e += 1);
        let _ = done.recv_timeout(Duration::from_secs(5));
        let until = Instant::now() + Duration::from_secs(5);
        while self.shared.open_conns.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Serves again on the same address after [`ApiServer::stop`]; when running, stops first
    /// (every connection is dropped).
    pub fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        let until = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.shared.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < until => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.serve(listener)
    }

    /// Whether the server accepts connections.
    pub fn is_running(&self) -> bool {
        lock(&self.serving).is_some()
    }

    // -- observation ---------------------------------------------------------------------------

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Waits (polling) until at least `n` watch streams are open.
    pub fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.open_watches() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.open_watches() >= n
    }

    /// Requests answered since start.
    pub fn request_count(&self) -> u64 {
        self.shared.total_requests.load(Ordering::Relaxed)
    }

    /// The last requests answered (up to 10 000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).iter().cloned().collect()
    }
}

// The handle is shared freely between test threads and tasks (e.g. in an Arc).
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ApiServer>();
};

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn kind_of_value(obj: &Value) -> Result<Kind, ApiError> {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Kind::from_kind(kind, api_version).ok_or_else(|| {
        ApiError::bad_request(format!(
            "kind {kind:?} (apiVersion {api_version:?}) is not served by this test API server"
        ))
    })
}

fn to_value<K: Serialize>(obj: &K) -> Result<Value, ApiError> {
    serde_json::to_value(obj).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn from_value<K: DeserializeOwned>(v: Value) -> Result<K, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_shape() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "x", "tier": "web"}}});
        let m = |l: Option<&str>, f: Option<&str>| Selector::parse(l, f).unwrap().matches(&o);
        assert!(m(Some("app=x"), None));
        assert!(m(Some("app==x,tier"), None));
        assert!(!m(Some("app!=x"), None));
        assert!(m(Some("app in (x, y),!missing"), None));
        assert!(!m(Some("tier notin (web)"), None));
        assert!(m(None, Some("metadata.name=a,metadata.namespace==ns")));
        assert!(!m(None, Some("metadata.name!=a")));
    }

    #[test]
    fn strategic_merge_ports() {
        let mut t = json!({"spec": {"ports": [{"port": 80, "name": "http", "nodePort": 30080}, {"port": 443}]}});
        let p = json!({"spec": {"$setElementOrder/ports": [{"port": 80}, {"port": 443}],
            "ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "$patch": "delete"}]}});
        strategic_merge(Kind::Service, &mut t, &p);
        assert_eq!(
            t,
            json!({"spec": {"ports": [{"port": 80, "name": "http", "nodePort": 30080, "targetPort": 8080}]}})
        );
    }

    #[test]
    fn services_get_one_cluster_ip_per_family() {
        let api = ApiServer::start().unwrap();
        let svc = |name: &str, spec: Value| {
            let mut spec = spec;
            spec["type"] = json!("NodePort");
            spec["ports"] = json!([{"port": 80}]);
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default"}, "spec": spec})
        };
        let families = |o: &Value| -> (Vec<Option<&'static str>>, Value, Value) {
            let ips = o["spec"]["clusterIPs"].as_array().unwrap();
            (
                ips.iter().map(|i| family_of(i.as_str().unwrap())).collect(),
                o["spec"]["ipFamilies"].clone(),
                o["spec"]["ipFamilyPolicy"].clone(),
            )
        };
        let v4 = api.create_value(svc("v4", json!({}))).unwrap();
        assert_eq!(
            families(&v4),
            (vec![Some("IPv4")], json!(["IPv4"]), json!("SingleStack"))
        );
        let v6 = api
            .create_value(svc("v6", json!({"ipFamilies": ["IPv6"]})))
            .unwrap();
        assert_eq!(
            families(&v6),
            (vec![Some("IPv6")], json!(["IPv6"]), json!("SingleStack"))
        );
        let dual = api
            .create_value(svc(
                "dual",
                json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"}),
            ))
            .unwrap();
        assert_eq!(
            families(&dual),
            (
                vec![Some("IPv6"), Some("IPv4")],
                json!(["IPv6", "IPv4"]),
                json!("RequireDualStack")
            )
        );
        let prefer = api
            .create_value(svc("prefer", json!({"ipFamilyPolicy": "PreferDualStack"})))
            .unwrap();
        assert_eq!(families(&prefer).1, json!(["IPv4", "IPv6"]));
        assert_ne!(
            prefer["spec"]["clusterIPs"][1],
            dual["spec"]["clusterIPs"][0]
        );
        let err = api
            .create_value(svc("bad", json!({"ipFamilies": ["IPv4", "IPv6"]})))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("must be RequireDualStack or PreferDualStack"),
            "{err}"
        );
        api.stop();
    }

    #[test]
    fn target_parsing() {
        let t = parse_target(&["api", "v1", "namespaces", "ns", "services", "s"]).unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Service, Some("ns"), Some("s"))
        );
        let t = parse_target(&["api", "v1", "namespaces", "ns"]).unwrap();
        assert_eq!((t.kind, t.name.as_deref()), (Kind::Namespace, Some("ns")));
        let t = parse_target(&["api", "v1", "namespaces", "ns", "status"]).unwrap();
        assert_eq!(
            (t.kind, t.subresource.as_deref()),
            (Kind::Namespace, Some("status"))
        );
        let t =
            parse_target(&["apis", "discovery.k8s.io", "v1", "watch", "endpointslices"]).unwrap();
        assert!(t.watch_path && t.kind == Kind::EndpointSlice && t.namespace.is_none());
        assert!(parse_target(&["api", "v1", "namespaces", "ns", "nodes"]).is_none());
        assert!(parse_target(&["api", "v1", "pods"]).is_none());
    }
}
