//! Validation and compilation: policy files in, a [`Snapshot`] or every problem out.

use super::model::check_model;
use super::problem::{Problem, Problems, line_of};
use super::rows::{Effect, LinkRow, POLICY_FILE, PolicyRows};
use super::snapshot::{
    CallerInfo, CategoryInfo, GrantCell, GrantKey, Limits, MatchedRule, NodeId, PolicyVersion,
    PurposeInfo, SecrecyUse, Snapshot, Tree,
};
use super::source::PolicySource;
use super::taxonomy::{CallerKind, Sp, TAXONOMY_FILE, Taxonomy};
use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use std::sync::Arc;

/// casbin's default role manager follows at most this many links; deeper trees would decide
/// differently in casbin than in the index, so they are refused.
const MAX_DEPTH: usize = 10;

/// Validates `source` completely and compiles it. Every problem is reported, in file and line
/// order; nothing partial is ever returned.
pub async fn compile(source: PolicySource) -> Result<Snapshot, Problems> {
    let mut problems = Vec::new();
    check_model(&source.model, &mut problems).await;
    let rows = PolicyRows::parse(&source.policy, &mut problems);
    let taxonomy = match toml::from_str::<Taxonomy>(&source.taxonomy) {
        Ok(t) => Some(t),
        Err(e) => {
            let line = e.span().map(|s| line_of(&source.taxonomy, s.start));
            let message = e.message().to_owned();
            problems.push(match line {
                Some(line) => Problem::at(TAXONOMY_FILE, line, message),
                None => Problem::in_file(TAXONOMY_FILE, message),
            });
            // Nothing can be resolved without the taxonomy, but the routes are still read, so
            // that this one error does not hide their own (syntax, shape); their category
            // names are checked once the taxonomy parses.
            if let Some(text) = source.routes.as_deref() {
                super::routes::parse(text, &|_| true, &mut problems);
            }
            None
        }
    };
    let snapshot = taxonomy.and_then(|t| build(source, rows, t, &mut problems));
    match snapshot {
        Some(s) if problems.is_empty() => Ok(s),
        _ => {
            problems.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            problems.dedup();
            Err(Problems(problems))
        }
    }
}

/// Resolves names against the taxonomy and builds the index. Returns `None` only when nothing
/// sensible can be built; other problems are pushed and the build goes on to find more.
fn build(
    source: PolicySource,
    rows: PolicyRows,
    tax: Taxonomy,
    problems: &mut Vec<Problem>,
) -> Option<Snapshot> {
    let ctx = Ctx {
        tax_text: &source.taxonomy,
    };
    let mut problems_here = Vec::new();

    // Trees from the taxonomy's ids and the g2 / g3 rows.
    let purpose_names: Vec<&Sp> = tax.purposes.iter().map(|p| &p.id).collect();
    let category_names: Vec<&Sp> = tax.categories.iter().map(|c| &c.id).collect();
    let purpose_tree = ctx.tree(
        "purpose",
        "g2",
        &purpose_names,
        &rows.purposes,
        &mut problems_here,
    );
    let category_tree = ctx.tree(
        "category",
        "g3",
        &category_names,
        &rows.categories,
        &mut problems_here,
    );

    // Limits, resolved to node sets.
    let resolve_all = |names: &[Sp], tree: &TreeShape, what: &str, problems: &mut Vec<Problem>| {
        names
            .iter()
            .filter_map(|n| ctx.resolve(n, tree, what, problems))
            .collect::<Vec<_>>()
    };
    let sec_categories = resolve_all(
        &tax.secrecy.categories,
        &category_tree,
        "category",
        &mut problems_here,
    );
    let sec_purposes = resolve_all(
        &tax.secrecy.purposes,
        &purpose_tree,
        "purpose",
        &mut problems_here,
    );
    let sec_never = resolve_all(
        &tax.secrecy.never_purposes,
        &purpose_tree,
        "purpose",
        &mut problems_here,
    );
    let deid_purposes = resolve_all(
        &tax.deidentification.purposes,
        &purpose_tree,
        "purpose",
        &mut problems_here,
    );
    let deid_categories = resolve_all(
        &tax.deidentification.categories,
        &category_tree,
        "category",
        &mut problems_here,
    );
    let exempt = resolve_all(
        &tax.suspension.use_exempt_purposes,
        &purpose_tree,
        "purpose",
        &mut problems_here,
    );
    let provision = resolve_all(
        &tax.suspension.provision_purposes,
        &purpose_tree,
        "purpose",
        &mut problems_here,
    );
    let deletion_exempt = resolve_all(
        &tax.suspension.deletion_exempt_purposes,
        &purpose_tree,
        "purpose",
        &mut problems_here,
    );

    let within_any = |tree: &TreeShape, node: NodeId, set: &[NodeId]| {
        set.iter()
            .any(|a| tree.ancestors[node as usize].contains(a))
    };

    check_secrecy_floor(
        &ctx,
        &tax.secrecy,
        SecrecyTrees {
            purposes: &purpose_tree,
            categories: &category_tree,
            allowed: &sec_purposes,
            never: &sec_never,
            secret: &sec_categories,
        },
        &mut problems_here,
    );

    // Purpose facts, inherited down the tree.
    let purpose_info: Vec<PurposeInfo> = tax
        .purposes
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let node = i as NodeId;
            let nearest = |pick: &dyn Fn(usize) -> bool| {
                purpose_tree.ancestors[i]
                    .iter()
                    .map(|a| *a as usize)
                    .find(|a| pick(*a))
            };
            let consent_clause = nearest(&|a| tax.purposes[a].consent)
                .map(|a| Arc::<str>::from(tax.purposes[a].clause.as_str()));
            let recipient = nearest(&|a| tax.purposes[a].recipient.is_some()).and_then(|a| {
                let p = &tax.purposes[a];
                p.recipient
                    .as_ref()
                    .map(|r| (*r.get_ref(), Arc::<str>::from(p.clause.as_str())))
            });
            let manager = nearest(&|a| tax.purposes[a].manager.is_some()).and_then(|a| {
                let p = &tax.purposes[a];
                p.manager.as_ref().map(|m| {
                    (
                        Arc::<str>::from(m.name.as_str()),
                        Arc::<str>::from(m.clause.as_str()),
                    )
                })
            });
            let secrecy = if within_any(&purpose_tree, node, &sec_purposes) {
                SecrecyUse::Allowed
            } else if within_any(&purpose_tree, node, &sec_never) {
                SecrecyUse::Never
            } else {
                SecrecyUse::NeedsConsent
            };
            PurposeInfo {
                clause: entry.clause.as_str().into(),
                description: entry.description.as_str().into(),
                description_ja: entry.description_ja.as_str().into(),
                consent_clause,
                recipient,
                secrecy,
                deidentified_only: within_any(&purpose_tree, node, &deid_purposes),
                use_exempt: within_any(&purpose_tree, node, &exempt),
                deletion_exempt: within_any(&purpose_tree, node, &deletion_exempt),
                manager,
                provision: within_any(&purpose_tree, node, &provision),
                subject_required: nearest(&|a| tax.purposes[a].subject).is_some(),
            }
        })
        .collect();
    let category_info: Vec<CategoryInfo> = tax
        .categories
        .iter()
        .enumerate()
        .map(|(i, entry)| CategoryInfo {
            clause: entry.clause.as_str().into(),
            description: entry.description.as_str().into(),
            description_ja: entry.description_ja.as_str().into(),
            // A parent of communications data (a root above both trees, say) holds it too.
            secrecy: within_any(&category_tree, i as NodeId, &sec_categories)
                || sec_categories
                    .iter()
                    .any(|s| category_tree.ancestors[*s as usize].contains(&(i as NodeId))),
            deidentified: within_any(&category_tree, i as NodeId, &deid_categories),
        })
        .collect();

    // Roles: every name used by a caller, a g row or a p row.
    let caller_ids: FxHashSet<&str> = tax
        .callers
        .iter()
        .map(|c| c.id.get_ref().as_str())
        .collect();
    let mut roles = Interner::default();
    for c in &tax.callers {
        roles.intern(c.role.get_ref());
    }
    let mut role_parents: Vec<Vec<u32>> = Vec::new();
    for link in &rows.roles {
        for name in [&link.child, &link.parent] {
            if caller_ids.contains(name.as_str()) {
                problems_here.push(Problem::at(
                    POLICY_FILE,
                    link.line,
                    format!(
                        "`{name}` is a caller: callers are bound to roles in taxonomy.toml, `g` rows link roles to parent roles"
                    ),
                ));
            }
        }
        let child = roles.intern(&link.child);
        let parent = roles.intern(&link.parent);
        role_parents.resize(roles.names.len(), Vec::new());
        role_parents[child as usize].push(parent);
    }
    for row in &rows.grants {
        roles.intern(&row.role);
    }
    role_parents.resize(roles.names.len(), Vec::new());
    let role_closure = role_closures(&role_parents, &roles.names, &rows.roles, &mut problems_here);

    // Callers.
    let mut callers: Vec<CallerInfo> = Vec::with_capacity(tax.callers.len());
    let mut caller_index: FxHashMap<Box<str>, u32> = FxHashMap::default();
    let mut held_roles: FxHashSet<u32> = FxHashSet::default();
    for c in &tax.callers {
        let name = c.id.get_ref();
        let line = ctx.line(&c.id);
        if name.trim().is_empty() {
            problems_here.push(Problem::at(TAXONOMY_FILE, line, "caller id is empty"));
            continue;
        }
        if caller_index.contains_key(name.as_str()) {
            problems_here.push(Problem::at(
                TAXONOMY_FILE,
                line,
                format!("caller `{name}` is declared twice"),
            ));
            continue;
        }
        let role = roles.get(c.role.get_ref()).unwrap_or(0);
        let closure = role_closure.get(role as usize).cloned().unwrap_or_default();
        held_roles.extend(closure.iter().copied());
        let registered = c
            .purposes
            .iter()
            .filter_map(|p| ctx.resolve(p, &purpose_tree, "purpose", &mut problems_here))
            .collect();
        let id = callers.len() as u32;
        caller_index.insert(name.as_str().into(), id);
        callers.push(CallerInfo {
            name: name.as_str().into(),
            id,
            kind: c.kind,
            role: c.role.get_ref().as_str().into(),
            clause: c.clause.as_str().into(),
            description: c.description.as_str().into(),
            description_ja: c.description_ja.as_str().into(),
            roles: closure,
            registered,
        });
    }

    // Grants: resolve, check the secrecy limit at load, index.
    let never_recipients: SmallVec<[CallerKind; 2]> =
        tax.secrecy.never_recipients.iter().copied().collect();
    let mut grants: FxHashMap<GrantKey, GrantCell> = FxHashMap::default();
    let mut rules = Vec::with_capacity(rows.grants.len());
    for row in &rows.grants {
        let mut ok = true;
        let role = roles.get(&row.role).unwrap_or(0);
        if caller_ids.contains(row.role.as_str()) {
            problems_here.push(Problem::at(
                POLICY_FILE,
                row.line,
                format!("`{}` is a caller, not a role: `p` rows grant to roles (taxonomy.toml binds callers to roles)", row.role),
            ));
            ok = false;
        } else if !held_roles.contains(&role) {
            problems_here.push(Problem::at(
                POLICY_FILE,
                row.line,
                format!(
                    "role `{}` is held by no caller (taxonomy.toml binds callers to roles)",
                    row.role
                ),
            ));
            ok = false;
        }
        let purpose = purpose_tree.index.get(row.purpose.as_str()).copied();
        if purpose.is_none() {
            problems_here.push(Problem::at(
                POLICY_FILE,
                row.line,
                format!(
                    "unknown purpose `{}`{}",
                    row.purpose,
                    suggest(&row.purpose, &purpose_tree.names)
                ),
            ));
        }
        let category = category_tree.index.get(row.category.as_str()).copied();
        if category.is_none() {
            problems_here.push(Problem::at(
                POLICY_FILE,
                row.line,
                format!(
                    "unknown category `{}`{}",
                    row.category,
                    suggest(&row.category, &category_tree.names)
                ),
            ));
        }
        let (Some(purpose), Some(category), true) = (purpose, category, ok) else {
            continue;
        };
        if row.effect == Effect::Allow {
            check_secrecy_grant(
                row.line,
                &row.role,
                role,
                purpose,
                category,
                &purpose_tree,
                &category_tree,
                &purpose_info,
                &category_info,
                &callers,
                &never_recipients,
                &tax.secrecy.clause,
                &mut problems_here,
            );
        }
        let id = rules.len() as u32;
        rules.push(MatchedRule {
            rule: format!(
                "p, {}, {}, {}, {}, {}",
                row.role,
                row.purpose,
                row.category,
                row.action.as_str(),
                if row.effect == Effect::Allow {
                    "allow"
                } else {
                    "deny"
                }
            )
            .into(),
            line: row.line,
        });
        let cell = grants
            .entry(GrantKey {
                role,
                purpose,
                category,
                action: row.action,
            })
            .or_default();
        match row.effect {
            Effect::Allow => cell.allow.push(id),
            Effect::Deny => cell.deny.push(id),
        }
    }

    let mut routes = source
        .routes
        .as_deref()
        .map_or_else(Default::default, |text| {
            let known = |c: &str| category_tree.index.contains_key(c);
            super::routes::parse(text, &known, &mut problems_here)
        });
    let categories = category_tree.into_tree(category_info);
    let mut warnings = Vec::new();
    if problems_here.is_empty() {
        super::inspect::inspect_routes(
            &source.descriptors,
            &mut routes,
            &categories,
            &mut problems_here,
            &mut warnings,
        );
    }

    let empty = problems_here.is_empty();
    problems.append(&mut problems_here);
    if !empty {
        return None;
    }
    let version = PolicyVersion(source.digest());
    Some(Snapshot {
        version,
        purposes: purpose_tree.into_tree(purpose_info),
        categories,
        callers,
        caller_index,
        roles: roles.names.into_iter().map(Arc::from).collect(),
        grants,
        rules,
        limits: Limits {
            secrecy_clause: tax.secrecy.clause.as_str().into(),
            never_recipients,
            deidentification_clause: tax.deidentification.clause.as_str().into(),
            suspension_clause: tax.suspension.clause.as_str().into(),
        },
        routes,
        warnings,
        source,
        rows,
    })
}

/// The §5 floor, built into pdgate whatever a bundle's taxonomy says (DESIGN §2): communications
/// data only for these purposes (and their children) without the subject's separate consent;
/// never for these; never to joint users or third parties. A taxonomy may narrow it, never
/// widen it: a `[secrecy]` section that would is refused, so that one push cannot hand call
/// history to marketing.
pub const SECRECY_FLOOR_ALLOWED: [&str; 6] = [
    "service.provision",
    "service.billing",
    "service.support",
    "fraud",
    "subject_request.disclosure",
    "subject_request.deletion",
];
/// See [`SECRECY_FLOOR_ALLOWED`].
pub const SECRECY_FLOOR_NEVER: [&str; 4] = ["marketing", "research", "joint_use", "third_party"];
/// The category whose subtree is communications data, when the taxonomy defines it.
pub const SECRECY_FLOOR_CATEGORY: &str = "communications";

/// The resolved `[secrecy]` sets, and the trees they are in.
struct SecrecyTrees<'a> {
    purposes: &'a TreeShape,
    categories: &'a TreeShape,
    allowed: &'a [NodeId],
    never: &'a [NodeId],
    secret: &'a [NodeId],
}

/// Refuses a `[secrecy]` section that is wider than the floor: a purpose allowed
/// communications data outside [`SECRECY_FLOOR_ALLOWED`], a floor never-purpose the taxonomy
/// defines but does not list in `never_purposes`, a recipient kind missing from
/// `never_recipients` (when the taxonomy has communications data at all), or `communications`
/// not secret.
fn check_secrecy_floor(
    ctx: &Ctx<'_>,
    secrecy: &super::taxonomy::SecrecyLimit,
    trees: SecrecyTrees<'_>,
    problems: &mut Vec<Problem>,
) {
    let within = |tree: &TreeShape, node: NodeId, outer: NodeId| {
        tree.ancestors[node as usize].contains(&outer)
    };
    let floor_ids = |names: &[&str], tree: &TreeShape| -> Vec<NodeId> {
        names
            .iter()
            .filter_map(|n| tree.index.get(*n).copied())
            .collect()
    };
    let section_line = line_of(ctx.tax_text, ctx.tax_text.find("[secrecy]").unwrap_or(0));
    let floor = "pdgate's §5 floor (DESIGN §2) holds whatever the policy says; a policy may narrow it, never widen it";
    let allowed = floor_ids(&SECRECY_FLOOR_ALLOWED, trees.purposes);
    for (name, node) in secrecy.purposes.iter().zip(trees.allowed) {
        if !allowed.iter().any(|a| within(trees.purposes, *node, *a)) {
            problems.push(Problem::at(
                TAXONOMY_FILE,
                ctx.line(name),
                format!(
                    "`[secrecy] purposes` lists `{}`, which may not have communications data without the subject's separate consent: only {} may ({floor})",
                    name.get_ref(),
                    SECRECY_FLOOR_ALLOWED.map(|p| format!("`{p}`")).join(", ")
                ),
            ));
        }
    }
    for (floor_name, node) in SECRECY_FLOOR_NEVER
        .iter()
        .filter_map(|n| trees.purposes.index.get(*n).map(|id| (*n, *id)))
    {
        if !trees.never.iter().any(|n| within(trees.purposes, node, *n)) {
            problems.push(Problem::at(
                TAXONOMY_FILE,
                section_line,
                format!(
                    "`[secrecy] never_purposes` must cover `{floor_name}`: it never gets communications data ({floor})"
                ),
            ));
        }
    }
    // Only a taxonomy that has communications data has anything to keep from recipients.
    let has_comms =
        !trees.secret.is_empty() || trees.categories.index.contains_key(SECRECY_FLOOR_CATEGORY);
    for kind in [CallerKind::JointUser, CallerKind::ThirdParty] {
        if has_comms && !secrecy.never_recipients.contains(&kind) {
            problems.push(Problem::at(
                TAXONOMY_FILE,
                section_line,
                format!(
                    "`[secrecy] never_recipients` must list `{}`: communications data is never provided to one ({floor})",
                    kind.as_str()
                ),
            ));
        }
    }
    if let Some(&comms) = trees.categories.index.get(SECRECY_FLOOR_CATEGORY)
        && !trees
            .secret
            .iter()
            .any(|s| within(trees.categories, comms, *s))
    {
        problems.push(Problem::at(
            TAXONOMY_FILE,
            section_line,
            format!(
                "`[secrecy] categories` must cover `{SECRECY_FLOOR_CATEGORY}`: it is communications data ({floor})"
            ),
        ));
    }
}

/// Refuses an allow row that would hand communications data to a purpose or a recipient that
/// §5 never allows. A row covers every purpose and category below the ones it names.
#[expect(
    clippy::too_many_arguments,
    reason = "one check over the whole compile context"
)]
fn check_secrecy_grant(
    line: usize,
    role_name: &str,
    role: u32,
    purpose: NodeId,
    category: NodeId,
    purposes: &TreeShape,
    categories: &TreeShape,
    purpose_info: &[PurposeInfo],
    category_info: &[CategoryInfo],
    callers: &[CallerInfo],
    never_recipients: &[CallerKind],
    clause: &str,
    problems: &mut Vec<Problem>,
) {
    let covered_secret = (0..categories.names.len() as NodeId).find(|c| {
        category_info[*c as usize].secrecy && categories.ancestors[*c as usize].contains(&category)
    });
    let Some(secret) = covered_secret else {
        return;
    };
    let secret_name = &categories.names[secret as usize];
    if let Some(bad) = (0..purposes.names.len() as NodeId).find(|p| {
        purposes.ancestors[*p as usize].contains(&purpose)
            && purpose_info[*p as usize].secrecy == SecrecyUse::Never
    }) {
        problems.push(Problem::at(
            POLICY_FILE,
            line,
            format!(
                "grants communications data (`{secret_name}`) for purpose `{}`, which the secrecy of communications never allows ({clause})",
                purposes.names[bad as usize]
            ),
        ));
    }
    let mut recipients: Vec<&CallerInfo> = callers
        .iter()
        .filter(|c| c.roles.contains(&role) && never_recipients.contains(&c.kind))
        .collect();
    recipients.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(c) = recipients.first() {
        problems.push(Problem::at(
            POLICY_FILE,
            line,
            format!(
                "grants communications data (`{secret_name}`) to role `{role_name}`, held by {} `{}`: communications data is never provided to joint users or third parties ({clause})",
                c.kind.as_str(),
                c.name
            ),
        ));
    }
}

/// A tree under construction (names and links resolved, no per-node facts yet).
struct TreeShape {
    names: Vec<String>,
    index: FxHashMap<Box<str>, NodeId>,
    ancestors: Vec<SmallVec<[NodeId; 4]>>,
}

impl TreeShape {
    fn into_tree<T>(self, info: Vec<T>) -> Tree<T> {
        let descendants = self.descendants();
        Tree {
            names: self.names.into_iter().map(Arc::from).collect(),
            index: self.index,
            ancestors: self.ancestors,
            descendants,
            info,
        }
    }

    fn descendants(&self) -> Vec<Vec<NodeId>> {
        let mut below = vec![Vec::new(); self.names.len()];
        for (node, chain) in self.ancestors.iter().enumerate() {
            for ancestor in chain.iter().skip(1) {
                below[*ancestor as usize].push(node as NodeId);
            }
        }
        below
    }
}

struct Ctx<'a> {
    tax_text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, sp: &Sp) -> usize {
        line_of(self.tax_text, sp.span().start)
    }

    fn resolve(
        &self,
        name: &Sp,
        tree: &TreeShape,
        what: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<NodeId> {
        let found = tree.index.get(name.get_ref().as_str()).copied();
        if found.is_none() {
            problems.push(Problem::at(
                TAXONOMY_FILE,
                self.line(name),
                format!(
                    "unknown {what} `{}`{}",
                    name.get_ref(),
                    suggest(name.get_ref(), &tree.names)
                ),
            ));
        }
        found
    }

    /// Builds a tree from declared ids and `kind` rows (`g2`/`g3`): unknown ids, a second
    /// parent, a cycle or a depth casbin would not follow are problems.
    fn tree(
        &self,
        what: &str,
        kind: &str,
        ids: &[&Sp],
        links: &[LinkRow],
        problems: &mut Vec<Problem>,
    ) -> TreeShape {
        let mut names = Vec::with_capacity(ids.len());
        let mut index: FxHashMap<Box<str>, NodeId> = FxHashMap::default();
        for id in ids {
            let name = id.get_ref();
            if name.trim().is_empty() || name.contains(',') || name.chars().any(char::is_whitespace)
            {
                problems.push(Problem::at(
                    TAXONOMY_FILE,
                    self.line(id),
                    format!("{what} id `{name}` must be non-empty, without spaces or commas"),
                ));
            }
            if index.contains_key(name.as_str()) {
                problems.push(Problem::at(
                    TAXONOMY_FILE,
                    self.line(id),
                    format!("{what} `{name}` is declared twice"),
                ));
                // Keep indexes aligned with the taxonomy entries.
                names.push(name.clone());
                continue;
            }
            index.insert(name.as_str().into(), names.len() as NodeId);
            names.push(name.clone());
        }
        let mut parent: Vec<Option<(NodeId, usize)>> = vec![None; names.len()];
        for link in links {
            let child = index.get(link.child.as_str()).copied();
            let up = index.get(link.parent.as_str()).copied();
            for (name, found) in [(&link.child, child), (&link.parent, up)] {
                if found.is_none() {
                    problems.push(Problem::at(
                        POLICY_FILE,
                        link.line,
                        format!(
                            "unknown {what} `{name}` in a `{kind}` row{}",
                            suggest(name, &names)
                        ),
                    ));
                }
            }
            let (Some(child), Some(up)) = (child, up) else {
                continue;
            };
            match parent[child as usize] {
                Some((existing, line)) if existing != up => problems.push(Problem::at(
                    POLICY_FILE,
                    link.line,
                    format!(
                        "{what} `{}` already has parent `{}` (line {line}): each {what} has one parent",
                        link.child, names[existing as usize]
                    ),
                )),
                Some(_) => {}
                None => parent[child as usize] = Some((up, link.line)),
            }
        }
        let mut ancestors = Vec::with_capacity(names.len());
        let mut cyclic: FxHashSet<NodeId> = FxHashSet::default();
        for start in 0..names.len() as NodeId {
            let mut chain: SmallVec<[NodeId; 4]> = SmallVec::new();
            chain.push(start);
            let mut at = start;
            while let Some((up, line)) = parent[at as usize] {
                if chain.contains(&up) {
                    if cyclic.insert(up) {
                        let path: Vec<&str> =
                            chain.iter().map(|n| names[*n as usize].as_str()).collect();
                        problems.push(Problem::at(
                            POLICY_FILE,
                            line,
                            format!(
                                "cycle in the {what} tree: {} -> {}",
                                path.join(" -> "),
                                names[up as usize]
                            ),
                        ));
                    }
                    break;
                }
                chain.push(up);
                at = up;
            }
            if chain.len() > MAX_DEPTH + 1 && cyclic.insert(start) {
                problems.push(Problem::in_file(
                    POLICY_FILE,
                    format!(
                        "{what} `{}` is {} levels deep; casbin follows at most {MAX_DEPTH}",
                        names[start as usize],
                        chain.len() - 1
                    ),
                ));
            }
            ancestors.push(chain);
        }
        TreeShape {
            names,
            index,
            ancestors,
        }
    }
}

#[derive(Default)]
struct Interner {
    names: Vec<String>,
    index: FxHashMap<String, u32>,
}

impl Interner {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.index.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), id);
        id
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }
}

/// For each role, itself and every role it inherits through `g` rows. A cycle is a problem.
fn role_closures(
    parents: &[Vec<u32>],
    names: &[String],
    links: &[LinkRow],
    problems: &mut Vec<Problem>,
) -> Vec<SmallVec<[u32; 2]>> {
    let mut reported = false;
    (0..parents.len() as u32)
        .map(|start| {
            let mut seen: SmallVec<[u32; 2]> = SmallVec::new();
            let mut stack = vec![(start, 0usize)];
            while let Some((role, depth)) = stack.pop() {
                if role == start && depth > 0 {
                    if !reported {
                        reported = true;
                        let line = links
                            .iter()
                            .find(|l| l.child == names[start as usize])
                            .map_or(1, |l| l.line);
                        problems.push(Problem::at(
                            POLICY_FILE,
                            line,
                            format!(
                                "cycle in the role hierarchy through `{}`",
                                names[start as usize]
                            ),
                        ));
                    }
                    continue;
                }
                if seen.contains(&role) || depth > MAX_DEPTH {
                    continue;
                }
                seen.push(role);
                for p in &parents[role as usize] {
                    stack.push((*p, depth + 1));
                }
            }
            seen
        })
        .collect()
}

/// ` (did you mean `x`?)` when a known name is close to `name`.
fn suggest(name: &str, known: &[String]) -> String {
    let best = known
        .iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2.max(name.len() / 4))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, k)) => format!(" (did you mean `{k}`?)"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
