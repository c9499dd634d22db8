//! Reading the protected service's messages (`src/message/`): clearing the minimized
//! categories' fields from a 1 KiB response (target: ≤ 10 µs median), the same response when
//! nothing is cleared (no copy), reading the subject of a request — each beside what the
//! generated prost types take to decode and re-encode the same message, measured in the same
//! run (a ratio, not a bare figure: this machine is shared).
//!
//!     cargo bench --bench message

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a benchmark whose setup fails should abort"
)]

use criterion::{Criterion, criterion_group, criterion_main};
use pdgate::message::{self, SubjectPath};
use pdgate::policy::inspect::Inspection;
use pdgate::proto::demo::{GetProfileRequest, Profile};
use prost::Message;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

const PROFILE: &str = "/demo.customer.v1.CustomerData/GetProfile";

/// The GetProfile route's inspection, compiled from the repository's policy and descriptors.
fn inspection() -> Arc<Inspection> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let snapshot = runtime.block_on(pdgate::policy::load_dir(&dir)).unwrap();
    snapshot
        .route(PROFILE)
        .and_then(|r| r.inspection.clone())
        .expect("GetProfile reads its messages")
}

/// A profile of about 1 KiB.
fn profile() -> Vec<u8> {
    let long = |s: &str, n: usize| s.repeat(n);
    let bytes = Profile {
        customer_id: "cust-000123".into(),
        name: long("山田 太郎 ", 12),
        email: long("taro.yamada@example.jp;", 10),
        address: long("1-2-3 Chiyoda, Chiyoda-ku, Tokyo 100-0001; ", 10),
        phone: long("+81-3-0000-0000;", 10),
    }
    .encode_to_vec();
    assert!((900..1300).contains(&bytes.len()), "{} bytes", bytes.len());
    bytes
}

fn bench(c: &mut Criterion) {
    let inspection = inspection();
    let plans = inspection.response.as_ref().unwrap();
    let bytes = profile();
    let email = inspection.mask(&["customer.contact.email"]);
    let mut group = c.benchmark_group("message");
    group.bench_function("minimize 1 KiB, e-mail cleared", |b| {
        b.iter(|| {
            message::minimize(black_box(&bytes), plans, Inspection::RESPONSE, email)
                .unwrap()
                .0
                .len()
        });
    });
    group.bench_function("minimize 1 KiB, nothing cleared", |b| {
        b.iter(|| {
            message::minimize(black_box(&bytes), plans, Inspection::RESPONSE, 0)
                .unwrap()
                .0
                .len()
        });
    });
    group.bench_function("prost decode + encode 1 KiB (baseline)", |b| {
        b.iter(|| {
            Profile::decode(black_box(&bytes[..]))
                .unwrap()
                .encode_to_vec()
                .len()
        });
    });
    let request = GetProfileRequest {
        customer_id: "cust-000123".into(),
    }
    .encode_to_vec();
    let path = inspection
        .request_subjects
        .clone()
        .unwrap_or(SubjectPath(vec![1]));
    group.bench_function("subjects of a request", |b| {
        b.iter(|| message::subjects(black_box(&request), &path).unwrap().len());
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
