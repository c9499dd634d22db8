//! The bodies of pdgate's fuzz targets (#14's adversarial suite), one plain function each.
//!
//! `fuzz/src/bin/*.rs` hands them to AFL++ (`cargo afl`, stable toolchain); the main crate's
//! `tests/hardening.rs` includes this file and replays every committed input of
//! `fuzz/corpus/<target>/` through them, so a regression shows in `cargo test` without AFL.
//!
//! Each body panics when pdgate does (a crash AFL records) and when a property that must hold
//! for every input does not: metadata is taken byte for byte, a policy that loads keeps the §5
//! floor and every problem names its file and a line inside it, a log that verifies fails to
//! verify after any one byte of it changes, and an index lookup finds what a scan finds.
//! Inputs are bytes; each target says how it reads them.

use http::{HeaderMap, HeaderName, HeaderValue};
use pdgate::audit::read::{self, Access, Filter};
use pdgate::audit::record::{GENESIS, chain_hash};
use pdgate::decision::{DecisionIds, Request, decide_fresh};
use pdgate::gate::bundle::{self, Bundle, TestFile};
use pdgate::gate::metadata::{
    self, CALLER, GRPC_TIMEOUT, MetadataError, PURPOSE, RECIPIENT, SUBJECT,
};
use pdgate::policy::{DescriptorFile, PolicySource, Snapshot};
use pdgate::subjects::{InMemorySubjects, SubjectState};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A target's body: one input, a panic on a crash or a broken property.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/corpus/<name>/` and `fuzz/src/bin/<name>.rs` call them.
pub const TARGETS: [(&str, Target); 4] = [
    ("metadata", metadata),
    ("policy", policy),
    ("descriptors", descriptors),
    ("audit", audit),
];

/// Metadata → call context. The input is a header block: lines of `name: value` (a line
/// without `: ` is skipped; names and values that HTTP/2 could not carry are skipped too). A
/// first line `@peer: NAME` stands for an mTLS caller.
///
/// Properties: a context comes out only when every value read is taken byte for byte —
/// purpose, caller and recipient equal their one header, the subjects are exactly the
/// comma-separated ids of every `x-data-subject` header, none empty or padded — and the
/// timeout is exactly what `grpc-timeout` says; an error names a header that is really wrong.
pub fn metadata(data: &[u8]) {
    let mut headers = HeaderMap::new();
    let mut peer = None;
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        let Some(at) = line.windows(2).position(|w| w == b": ") else {
            continue;
        };
        let (name, value) = (&line[..at], &line[at + 2..]);
        if i == 0 && name == b"@peer" {
            peer = Some(String::from_utf8_lossy(value).into_owned());
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let result = metadata::extract(&headers, peer.as_deref());
    let values = |name: &str| -> Vec<&[u8]> {
        headers
            .get_all(name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect()
    };
    match result {
        Ok(ctx) => {
            let one = |name: &str, got: &str| {
                let v = values(name);
                assert!(v.len() <= 1, "`{name}` given {} times, accepted", v.len());
                assert_eq!(
                    v.first().copied().unwrap_or_default(),
                    got.as_bytes(),
                    "`{name}` not taken byte for byte"
                );
            };
            one(PURPOSE, &ctx.purpose);
            match &peer {
                Some(p) => assert_eq!(&ctx.caller, p, "the authenticated caller was not used"),
                None => one(CALLER, &ctx.caller),
            }
            one(RECIPIENT, ctx.recipient.as_deref().unwrap_or_default());
            let ids: Vec<&[u8]> = values(SUBJECT)
                .into_iter()
                .flat_map(|v| v.split(|b| *b == b','))
                .collect();
            assert_eq!(ids.len(), ctx.subjects.len(), "subjects lost or invented");
            for (id, got) in ids.iter().zip(&ctx.subjects) {
                assert_eq!(*id, got.as_bytes(), "subject not taken byte for byte");
                assert!(
                    !got.is_empty() && got.trim() == got,
                    "empty or padded subject `{got}` accepted"
                );
            }
            for v in [&ctx.purpose, &ctx.caller] {
                assert!(
                    peer.is_some() || v.trim() == v,
                    "padded value `{v}` accepted"
                );
            }
            assert_eq!(
                ctx.timeout,
                reference_timeout(values(GRPC_TIMEOUT).first().copied())
            );
        }
        Err(e) => {
            let named = |name: &'static str| !values(name).is_empty();
            match e {
                MetadataError::Repeated(name, n) => assert_eq!(values(name).len(), n),
                MetadataError::NotText(name)
                | MetadataError::Empty(name)
                | MetadataError::Whitespace(name) => assert!(named(name), "{e} with no `{name}`"),
                MetadataError::Timeout(_) => {
                    let v = values(GRPC_TIMEOUT);
                    assert!(!v.is_empty(), "{e} with no timeout");
                    assert_eq!(
                        reference_timeout(v.first().copied()),
                        None,
                        "a good timeout refused: {e}"
                    );
                }
                other => panic!("metadata alone gave an error about something else: {other}"),
            }
        }
    }
}

/// `grpc-timeout` as the gRPC spec reads it: 1 to 8 ASCII digits and a unit.
fn reference_timeout(value: Option<&[u8]>) -> Option<Duration> {
    let (unit, digits) = value?.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The default policy (`policy/`), which a policy input changes one file of.
fn default_source() -> PolicySource {
    PolicySource {
        origin: PathBuf::from("fuzz"),
        model: include_str!("../../policy/model.conf").into(),
        policy: include_str!("../../policy/policy.csv").into(),
        taxonomy: include_str!("../../policy/taxonomy.toml").into(),
        routes: Some(include_str!("../../policy/routes.yaml").into()),
        descriptors: vec![DescriptorFile {
            name: "customer.proto".into(),
            content: include_bytes!("../../policy/descriptors/customer.proto").to_vec(),
        }],
    }
}

/// One small test file of the default policy, for a bundle's required test case.
const DEFAULT_TEST: &str = include_str!("../../policy/tests/s5_secrecy.yaml");

/// A runtime for the loader, which is async (casbin checks the model), built once per process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(
        || match tokio::runtime::Builder::new_current_thread().build() {
            Ok(rt) => rt,
            Err(e) => panic!("no tokio runtime: {e}"),
        },
    )
}

/// The policy bundle loader: csv, toml, yaml — the rows, the taxonomy, the routes, a policy
/// test file, the model. The first byte picks the file (its value modulo 5: `policy.csv`,
/// `taxonomy.toml`, `routes.yaml`, `tests/case.yaml`, `model.conf`); the rest replaces that
/// file of the default policy (input that is not UTF-8 is what a read refuses: skipped).
///
/// Properties: the loader does not panic; every problem it reports names a file of the bundle
/// and a line inside that file; a bundle it accepts keeps the §5 floor.
pub fn policy(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut source = default_source();
    let mut tests = vec![TestFile {
        name: "s5_secrecy.yaml".into(),
        content: DEFAULT_TEST.into(),
    }];
    match which % 5 {
        0 => source.policy = text.into(),
        1 => source.taxonomy = text.into(),
        2 => source.routes = Some(text.into()),
        3 => {
            tests = vec![TestFile {
                name: "case.yaml".into(),
                content: text.into(),
            }]
        }
        _ => source.model = text.into(),
    }
    check_bundle(Bundle { source, tests });
}

/// The protected service's descriptors: the first byte picks the form (even: a `.proto` file,
/// odd: a FileDescriptorSet, `.binpb`), the rest is the file, read with the default policy's
/// routes (which name fields of `demo.customer.v1`).
///
/// Properties: as [`policy`].
pub fn descriptors(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mut source = default_source();
    source.descriptors = vec![DescriptorFile {
        name: if which % 2 == 0 {
            "customer.proto"
        } else {
            "customer.binpb"
        }
        .into(),
        content: rest.to_vec(),
    }];
    check_bundle(Bundle {
        source,
        tests: vec![TestFile {
            name: "s5_secrecy.yaml".into(),
            content: DEFAULT_TEST.into(),
        }],
    });
}

fn check_bundle(bundle: Bundle) {
    let files = bundle_files(&bundle);
    match runtime().block_on(bundle::check(&bundle)) {
        Ok(checked) => keeps_the_floor(&checked.snapshot),
        Err(e) => {
            for p in e.problems() {
                let Some(text) = files
                    .iter()
                    .find(|(name, _)| *name == p.file)
                    .map(|(_, t)| t)
                else {
                    panic!("a problem names no file of the bundle: {p:?}");
                };
                if let Some(line) = p.line {
                    // One past the last line: "the file ends before …".
                    let lines = text.lines().count() + 1;
                    assert!(
                        line >= 1 && line <= lines,
                        "{p:?}: line {line} of a {lines}-line file"
                    );
                }
            }
        }
    }
}

/// Each file of `bundle` by the name its problems give, with its text (`None` for binary).
fn bundle_files(b: &Bundle) -> Vec<(String, String)> {
    let s = &b.source;
    let mut files = vec![
        ("model.conf".to_owned(), s.model.clone()),
        ("policy.csv".to_owned(), s.policy.clone()),
        ("taxonomy.toml".to_owned(), s.taxonomy.clone()),
        (
            "routes.yaml".to_owned(),
            s.routes.clone().unwrap_or_default(),
        ),
        ("tests/".to_owned(), String::new()),
    ];
    for d in &s.descriptors {
        let text = String::from_utf8_lossy(&d.content).into_owned();
        files.push((format!("descriptors/{}", d.name), text.clone()));
        files.push((d.name.clone(), text));
    }
    for t in &b.tests {
        files.push((format!("tests/{}", t.name), t.content.clone()));
    }
    files
}

/// §5 (DESIGN §2): whatever a bundle says, communications data never goes to marketing,
/// research, joint use or third parties — not even with the subject's consents to all of it.
fn keeps_the_floor(snapshot: &Snapshot) {
    let comms: Vec<String> = snapshot
        .categories()
        .iter_names()
        .filter(|c| c.as_ref() == "communications" || c.starts_with("communications."))
        .map(|c| c.to_string())
        .collect();
    if comms.is_empty() {
        return;
    }
    let purposes: Vec<String> = snapshot
        .purposes()
        .iter_names()
        .map(|p| p.to_string())
        .collect();
    let never: Vec<&String> = purposes
        .iter()
        .filter(|p| {
            ["marketing", "research", "joint_use", "third_party"]
                .iter()
                .any(|n| p.as_str() == *n || p.starts_with(&format!("{n}.")))
        })
        .collect();
    let everything: std::collections::BTreeSet<String> = purposes.iter().cloned().collect();
    let subjects = InMemorySubjects::new();
    subjects.set(
        "s-1",
        SubjectState {
            consent: everything.clone(),
            comms_consent: everything,
            ..SubjectState::default()
        },
    );
    let ids = DecisionIds::default();
    for caller in snapshot.callers() {
        for purpose in &never {
            for category in &comms {
                let request = Request {
                    caller: caller.name.to_string(),
                    purpose: (*purpose).clone(),
                    action: "read".into(),
                    categories: vec![category.clone()],
                    subjects: vec!["s-1".into()],
                    ..Request::default()
                };
                let d = decide_fresh(Some(snapshot), &request, &subjects, ids.next());
                assert!(
                    !d.allowed,
                    "the §5 floor was lowered: {request:?} allowed by {:?}",
                    d.matched_rules
                );
            }
        }
    }
}

/// The audit log reader and verifier. The input is lines of record text, each sealed by the
/// harness into a whole chain (`{"seq":N,"prev":"…",` + the line + the hash), so that the
/// verifier reads past the hash check into the records; then `HEAD`. The first byte says
/// where the segment is split in two (its value modulo the number of lines) and which byte of
/// the log the tamper check changes.
///
/// Properties: `verify` accepts the sealed log (or names the line that is not a record); when
/// it does, changing any one byte of a segment makes it fail; an index built from a segment
/// finds, for each decision id and subject, exactly the records a scan finds.
pub fn audit(data: &[u8]) {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let dir = AuditDir::new();
    let mut prev = GENESIS;
    let mut lines = Vec::new();
    for (i, body) in text.lines().take(64).enumerate() {
        let mut line = format!(
            "{{\"seq\":{},\"prev\":\"{}\",{body}",
            i + 1,
            hex::encode(prev)
        );
        let hash = chain_hash(&prev, line.as_bytes());
        line.push_str(&format!(",\"hash\":\"{}\"}}\n", hex::encode(hash)));
        prev = hash;
        lines.push(line);
    }
    let split = if lines.is_empty() {
        0
    } else {
        usize::from(knob) % lines.len()
    };
    let segments = [lines[..split].concat(), lines[split..].concat()];
    let paths: Vec<PathBuf> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| dir.write(&format!("segment-{:08}.jsonl", i + 1), s.as_bytes()))
        .collect();
    dir.write(
        "HEAD",
        format!("{} {}\n", lines.len(), hex::encode(prev)).as_bytes(),
    );

    let v = match read::verify(&dir.0) {
        Ok(v) => v,
        Err(e) => panic!("verify failed to run on a readable log: {e}"),
    };
    if !v.ok() {
        // Sealed right, so only a line that is not a record (or holds a second seq, prev or
        // hash) can break it.
        let Some(b) = v.first_break else {
            panic!("verify said not ok without a break");
        };
        assert!(b.line.is_some(), "a sealed log broken off any line: {b:?}");
        return;
    }
    assert_eq!(v.records, lines.len() as u64);

    // The index of the first (sealed) segment finds what a scan finds.
    if split > 0 && pdgate::audit::index::build(&paths[0]).is_ok() {
        let mut keys = Vec::new();
        let _ = read::scan_lines(&dir.0, &Filter::default(), Access::Scan, 0, |r, _| {
            keys.push((Some(r.body.decision_id.clone()), None));
            keys.extend(r.body.subjects.iter().map(|s| (None, Some(s.clone()))));
            keys.len() < 64
        });
        for (decision_id, subject) in keys {
            let filter = Filter {
                decision_id,
                subject,
                ..Filter::default()
            };
            let found = |access| {
                let mut seqs = Vec::new();
                match read::scan_lines(&dir.0, &filter, access, 0, |r, _| {
                    seqs.push(r.seq);
                    true
                }) {
                    Ok(()) => seqs,
                    Err(e) => panic!("scan failed on a verified log: {e}"),
                }
            };
            assert_eq!(
                found(Access::Indexed),
                found(Access::Scan),
                "index and scan differ for {filter:?}"
            );
        }
    }

    // Any one byte changed is seen. (Not its case: a hash's hex digits read the same either way.)
    let all = segments.concat().into_bytes();
    if !all.is_empty() {
        let at = (usize::from(knob) * 7919) % all.len();
        let mut bytes = all.clone();
        bytes[at] ^= 0x01;
        let (first, second) = bytes.split_at(segments[0].len());
        dir.write("segment-00000001.jsonl", first);
        dir.write("segment-00000002.jsonl", second);
        let _ = std::fs::remove_file(dir.0.join("segment-00000001.idx"));
        let tampered = read::verify(&dir.0).map(|v| v.ok()).unwrap_or(false);
        assert!(
            !tampered,
            "byte {at} changed ({:?} → {:?}) and the log still verifies",
            all[at] as char, bytes[at] as char
        );
    }
}

/// A scratch directory for one input (in `/dev/shm` when there is one: AFL runs thousands a
/// second), emptied when dropped.
struct AuditDir(PathBuf);

impl AuditDir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "pdgate-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        Self(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        if let Err(e) = std::fs::write(&path, bytes) {
            panic!("cannot write {}: {e}", path.display());
        }
        path
    }
}

impl Drop for AuditDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every input of `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` (crashes found and
/// fixed, kept as regressions), run through the target; returns how many.
pub fn replay(root: &Path, target: &str, body: Target) -> usize {
    let mut n = 0;
    for sub in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(sub).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) => panic!("cannot read {}: {e}", path.display()),
            };
            let result = std::panic::catch_unwind(|| body(&data));
            if result.is_err() {
                panic!("fuzz target `{target}` fails on {}", path.display());
            }
            n += 1;
        }
    }
    n
}
