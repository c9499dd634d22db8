//! The same policy as a plain casbin [`Enforcer`]: the reference that the compiled index is
//! checked against (differential tests, benchmarks). Not on the request path: casbin scans
//! every row per call.

use super::snapshot::Snapshot;
use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};

/// Builds a casbin enforcer from `snapshot`'s model and rows, binding each caller to its role
/// with a `g` row as taxonomy.toml does.
pub async fn enforcer(snapshot: &Snapshot) -> Result<Enforcer, casbin::Error> {
    let model = DefaultModel::from_str(&snapshot.source().model).await?;
    let mut enforcer = Enforcer::new(model, MemoryAdapter::default()).await?;
    let rows = snapshot.rows();
    let grants: Vec<Vec<String>> = rows
        .grants
        .iter()
        .map(|g| {
            vec![
                g.role.clone(),
                g.purpose.clone(),
                g.category.clone(),
                g.action.as_str().to_owned(),
                match g.effect {
                    super::Effect::Allow => "allow".to_owned(),
                    super::Effect::Deny => "deny".to_owned(),
                },
            ]
        })
        .collect();
    if !grants.is_empty() {
        enforcer.add_policies(grants).await?;
    }
    let mut roles: Vec<Vec<String>> = rows
        .roles
        .iter()
        .map(|l| vec![l.child.clone(), l.parent.clone()])
        .collect();
    roles.extend(
        snapshot
            .callers()
            .iter()
            .map(|c| vec![c.name.to_string(), c.role.to_string()]),
    );
    for (kind, links) in [
        ("g", roles),
        (
            "g2",
            rows.purposes
                .iter()
                .map(|l| vec![l.child.clone(), l.parent.clone()])
                .collect(),
        ),
        (
            "g3",
            rows.categories
                .iter()
                .map(|l| vec![l.child.clone(), l.parent.clone()])
                .collect(),
        ),
    ] {
        if !links.is_empty() {
            enforcer.add_named_grouping_policies(kind, links).await?;
        }
    }
    Ok(enforcer)
}

/// casbin's answer for one category: may `caller` do `action` on `category` for `purpose`?
pub fn enforce(
    enforcer: &Enforcer,
    caller: &str,
    purpose: &str,
    category: &str,
    action: &str,
) -> Result<bool, casbin::Error> {
    enforcer.enforce((caller, purpose, category, action))
}
