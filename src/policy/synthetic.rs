//! Generated policies, for the differential tests against casbin and for the benchmarks that
//! show how decision cost grows with the number of rules. Deterministic for a given seed.

use super::source::PolicySource;
use std::fmt::Write as _;

/// A small deterministic generator (SplitMix64): no dependency, same sequence everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

const MODEL: &str = super::model::SUPPORTED_MODEL;

/// Shape of a random policy.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub purposes: usize,
    pub categories: usize,
    pub roles: usize,
    pub callers: usize,
    pub rows: usize,
    /// Percent of `p` rows that deny.
    pub deny_percent: u64,
}

/// A random, valid policy: random purpose and category forests (each node's parent is an
/// earlier node, so no cycles), random role inheritance (a role inherits from earlier roles),
/// callers bound to random roles, and random grant rows. No secrecy or de-identification
/// limits apply, so that every generated row is loadable: the differential tests compare
/// stage 2 (the grants) with casbin.
pub fn random_policy(seed: u64, shape: Shape) -> PolicySource {
    let mut rng = Rng::new(seed);
    let mut policy = String::new();
    let mut taxonomy = String::new();
    let purpose = |i: usize| format!("pur{i}");
    let category = |i: usize| format!("cat{i}");
    let role = |i: usize| format!("role:r{i}");
    for i in 0..shape.purposes {
        let _ = writeln!(
            taxonomy,
            "[[purpose]]\nid = \"{}\"\nclause = \"§1\"\n",
            purpose(i)
        );
        if i > 0 && rng.chance(70) {
            let _ = writeln!(policy, "g2, {}, {}", purpose(i), purpose(rng.below(i)));
        }
    }
    for i in 0..shape.categories {
        let _ = writeln!(
            taxonomy,
            "[[category]]\nid = \"{}\"\nclause = \"§1\"\n",
            category(i)
        );
        if i > 0 && rng.chance(70) {
            let _ = writeln!(policy, "g3, {}, {}", category(i), category(rng.below(i)));
        }
    }
    for i in 1..shape.roles {
        if rng.chance(30) {
            let _ = writeln!(policy, "g, {}, {}", role(i), role(rng.below(i)));
        }
    }
    // Every role is held by some caller, so that every row is live.
    for i in 0..shape.callers.max(shape.roles) {
        let r = if i < shape.roles {
            i
        } else {
            rng.below(shape.roles)
        };
        let _ = writeln!(
            taxonomy,
            "[[caller]]\nid = \"caller{i}\"\nrole = \"{}\"\nkind = \"internal\"\npurposes = [{}]\nclause = \"§1\"\n",
            role(r),
            (0..shape.purposes)
                .map(|p| format!("\"{}\"", purpose(p)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for _ in 0..shape.rows {
        let _ = writeln!(
            policy,
            "p, {}, {}, {}, {}, {}",
            role(rng.below(shape.roles)),
            purpose(rng.below(shape.purposes)),
            category(rng.below(shape.categories)),
            ["read", "write", "delete"][rng.below(3)],
            if rng.chance(shape.deny_percent) {
                "deny"
            } else {
                "allow"
            }
        );
    }
    taxonomy.push_str(
        "[secrecy]\nclause = \"§5\"\ncategories = []\npurposes = []\nnever_purposes = []\nnever_recipients = []\n\n\
         [deidentification]\nclause = \"§1(3)\"\npurposes = []\ncategories = []\n\n\
         [suspension]\nclause = \"§7\"\nuse_exempt_purposes = []\nprovision_purposes = []\ndeletion_exempt_purposes = []\n",
    );
    PolicySource {
        origin: format!("<random policy, seed {seed}>").into(),
        model: MODEL.to_owned(),
        policy,
        taxonomy,
        routes: None,
        descriptors: Vec::new(),
    }
}

/// The default policy grown to about `rows` grant rows: generated roles, each held by one
/// generated internal caller, with grants over the default vocabulary that stay inside the
/// secrecy limit. The default callers and rules are unchanged, so a request of the default
/// policy decides the same at every size; only the index grows.
pub fn scaled_default(base: &PolicySource, rows: usize, seed: u64) -> PolicySource {
    let mut rng = Rng::new(seed);
    let purposes = [
        "service.provision",
        "service.billing",
        "service.support",
        "service.shipping",
        "inquiry",
        "inquiry.response",
        "fraud.prevention",
        "research.statistics",
        "marketing.email",
    ];
    let categories = [
        "customer.name",
        "customer.contact",
        "customer.contact.email",
        "customer.contract",
        "customer.billing",
        "customer.usage_history",
        "customer.equipment",
        "deidentified",
    ];
    let per_role = 100;
    let roles = rows.div_ceil(per_role).max(1);
    let mut policy = base.policy.clone();
    let mut taxonomy = base.taxonomy.clone();
    policy.push_str("\n# --- generated ---\n");
    for r in 0..roles {
        let _ = writeln!(
            taxonomy,
            "\n[[caller]]\nid = \"gen-caller-{r}\"\nrole = \"role:gen{r}\"\nkind = \"internal\"\npurposes = [\"service\", \"inquiry\", \"fraud\", \"research\", \"marketing\"]\nclause = \"§1\""
        );
        for _ in 0..per_role.min(rows - r * per_role) {
            let _ = writeln!(
                policy,
                "p, role:gen{r}, {}, {}, {}, {}",
                purposes[rng.below(purposes.len())],
                categories[rng.below(categories.len())],
                ["read", "write", "delete"][rng.below(3)],
                if rng.chance(10) { "deny" } else { "allow" }
            );
        }
    }
    PolicySource {
        origin: format!("<default policy + {rows} generated rows>").into(),
        model: base.model.clone(),
        policy,
        taxonomy,
        routes: base.routes.clone(),
        descriptors: base.descriptors.clone(),
    }
}
