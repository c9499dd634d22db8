//! `policy.csv` in casbin's format, read with line numbers so that every problem can say where.

use super::problem::Problem;

pub const POLICY_FILE: &str = "policy.csv";

/// The actions a grant can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Read,
    Write,
    Delete,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Read, Action::Write, Action::Delete];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    Allow,
    Deny,
}

/// One `p` row: a grant (or an explicit deny) for a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub line: usize,
    pub role: String,
    pub purpose: String,
    pub category: String,
    pub action: Action,
    pub effect: Effect,
}

/// One `g`, `g2` or `g3` row: `child` inherits from `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRow {
    pub line: usize,
    pub child: String,
    pub parent: String,
}

/// The rows of `policy.csv`, sorted by kind, each keeping its line.
#[derive(Debug, Clone, Default)]
pub struct PolicyRows {
    pub grants: Vec<GrantRow>,
    /// `g`: role inheritance.
    pub roles: Vec<LinkRow>,
    /// `g2`: the purpose tree.
    pub purposes: Vec<LinkRow>,
    /// `g3`: the category tree.
    pub categories: Vec<LinkRow>,
}

impl PolicyRows {
    /// Parses casbin's CSV policy format: comma separated, fields trimmed, `#` starts a comment
    /// line. Malformed rows become problems; the rest is still read so all problems show at once.
    pub fn parse(text: &str, problems: &mut Vec<Problem>) -> Self {
        let mut rows = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split(',').map(str::trim).collect();
            if let Some(empty) = fields.iter().position(|f| f.is_empty()) {
                problems.push(Problem::at(
                    POLICY_FILE,
                    line,
                    format!("field {} is empty", empty + 1),
                ));
                continue;
            }
            match fields[0] {
                "p" => {
                    if let Some(row) = parse_grant(line, &fields, problems) {
                        rows.grants.push(row);
                    }
                }
                kind @ ("g" | "g2" | "g3") => {
                    if fields.len() != 3 {
                        problems.push(Problem::at(
                            POLICY_FILE,
                            line,
                            format!(
                                "a `{kind}` row has 3 fields (`{kind}, child, parent`), found {}",
                                fields.len()
                            ),
                        ));
                        continue;
                    }
                    let link = LinkRow {
                        line,
                        child: fields[1].to_owned(),
                        parent: fields[2].to_owned(),
                    };
                    match kind {
                        "g" => rows.roles.push(link),
                        "g2" => rows.purposes.push(link),
                        _ => rows.categories.push(link),
                    }
                }
                other => problems.push(Problem::at(
                    POLICY_FILE,
                    line,
                    format!("unknown row type `{other}`; allowed: `p`, `g`, `g2`, `g3`"),
                )),
            }
        }
        rows
    }

    /// Renders the rows back to casbin CSV (used for overlays in policy tests).
    pub fn push_text(text: &mut String, extra: &[String]) {
        for row in extra {
            if !text.ends_with('\n') && !text.is_empty() {
                text.push('\n');
            }
            text.push_str(row);
            text.push('\n');
        }
    }
}

fn parse_grant(line: usize, fields: &[&str], problems: &mut Vec<Problem>) -> Option<GrantRow> {
    if fields.len() != 6 {
        problems.push(Problem::at(
            POLICY_FILE,
            line,
            format!(
                "a `p` row has 6 fields (`p, role, purpose, category, action, allow|deny`), found {}",
                fields.len()
            ),
        ));
        return None;
    }
    let action = Action::parse(fields[4]);
    if action.is_none() {
        problems.push(Problem::at(
            POLICY_FILE,
            line,
            format!(
                "unknown action `{}`; allowed: `read`, `write`, `delete`",
                fields[4]
            ),
        ));
    }
    let effect = match fields[5] {
        "allow" => Some(Effect::Allow),
        "deny" => Some(Effect::Deny),
        other => {
            problems.push(Problem::at(
                POLICY_FILE,
                line,
                format!("unknown effect `{other}`; allowed: `allow`, `deny`"),
            ));
            None
        }
    };
    Some(GrantRow {
        line,
        role: fields[1].to_owned(),
        purpose: fields[2].to_owned(),
        category: fields[3].to_owned(),
        action: action?,
        effect: effect?,
    })
}
