//! `routes.yaml`: what each gRPC method of the protected service does to personal data. Part
//! of the policy snapshot (and of its version): a method with no route is denied.
//!
//! ```yaml
//! routes:
//!   /demo.customer.v1.CustomerData/GetProfile:
//!     action: read
//!     categories: [customer.name]                     # the call needs these: denied without
//!     minimize: [customer.contact.email]              # cleared from responses when not allowed
//!     subjects: customer_id                           # request field with the subject ids
//!     fields: { email: customer.contact.email }       # response field -> category, where the
//!                                                     # service's protos are not annotated
//!   /demo.customer.v1.CustomerData/ExportForInterconnect:
//!     records: customer_id                            # each streamed response message is a
//!                                                     # record about this field's subject
//! ```
//!
//! Reading messages (`subjects: <field>`, `minimize`, `fields`) needs the service's
//! descriptors in `descriptors/`; see `policy::inspect`.

use super::inspect::Inspection;
use super::problem::{Problem, line_of, yaml_error_line};
use super::rows::Action;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const ROUTES_FILE: &str = "routes.yaml";

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    routes: BTreeMap<String, RouteEntry>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    action: String,
    categories: Vec<String>,
    #[serde(default)]
    minimize: Vec<String>,
    #[serde(default)]
    subjects: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    records: Option<String>,
}

/// Where the data-subject ids of a call are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectSource {
    /// The `x-data-subject` metadata, repeatable: what the caller says. `explicit` when the
    /// route says `subjects: metadata` (either way validation warns that it trusts the
    /// caller).
    Metadata { explicit: bool },
    /// A field path of the request message (`customer_id`, `updates[].customer_id`); the
    /// `x-data-subject` metadata, when given, must name exactly the same subjects.
    Message(String),
}

/// One method's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub action: Action,
    /// The categories the call needs: without a grant to each, it is denied.
    pub categories: Vec<String>,
    /// The categories it may go without: response fields of these are cleared when the
    /// purpose may not have them, instead of denying the call.
    pub minimize: Vec<String>,
    pub subjects: SubjectSource,
    /// Response field paths and their categories, where the protos are not annotated.
    pub fields: BTreeMap<String, String>,
    /// The response field naming the subject of each message of a server stream (an export
    /// of many customers): each message is a record decided for its own subject, and dropped
    /// when that subject's state does not allow it (`policy::inspect`).
    pub records: Option<String>,
    /// Where the route stands in `routes.yaml`.
    pub line: usize,
    /// What pdgate reads and rewrites of the method's messages, when it reads them.
    pub inspection: Option<Arc<Inspection>>,
}

impl Route {
    /// Whether calls of this route are read (subjects from the request, responses
    /// minimized): only then is a message ever decoded.
    pub fn reads_messages(&self) -> bool {
        self.inspection.is_some()
    }
}

/// The JSON Schema of `routes.yaml` (for editors; `pdgate policy schema routes`).
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(RoutesFile)
}

/// Parses and checks the routes against the category tree. Problems name the route.
pub(crate) fn parse(
    text: &str,
    category_known: &dyn Fn(&str) -> bool,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, Route> {
    let file: RoutesFile = match serde_yaml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            problems.push(match e.location() {
                Some(l) => Problem::at(ROUTES_FILE, yaml_error_line(text, l.line()), e.to_string()),
                None => Problem::in_file(ROUTES_FILE, e.to_string()),
            });
            return BTreeMap::new();
        }
    };
    let mut routes = BTreeMap::new();
    for (path, entry) in file.routes {
        let mut ok = true;
        let line = text.find(&path).map_or(1, |at| line_of(text, at));
        let well_formed = path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(service, method)| {
                !service.is_empty() && !method.is_empty() && !method.contains('/')
            });
        if !well_formed {
            problems.push(Problem::at(
                ROUTES_FILE,
                line,
                format!("route `{path}`: a route is a gRPC method path, `/package.Service/Method`"),
            ));
            ok = false;
        }
        let action = Action::parse(&entry.action);
        if action.is_none() {
            problems.push(Problem::at(
                ROUTES_FILE,
                line,
                format!(
                    "route `{path}`: unknown action `{}`; allowed: `read`, `write`, `delete`",
                    entry.action
                ),
            ));
        }
        if entry.categories.is_empty() {
            problems.push(Problem::at(
                ROUTES_FILE,
                line,
                format!("route `{path}`: names no category"),
            ));
            ok = false;
        }
        for c in entry.categories.iter().chain(&entry.minimize) {
            if !category_known(c) {
                problems.push(Problem::at(
                    ROUTES_FILE,
                    line,
                    format!("route `{path}`: unknown category `{c}`"),
                ));
                ok = false;
            }
        }
        if entry.minimize.len() > 64 {
            problems.push(Problem::at(
                ROUTES_FILE,
                line,
                format!(
                    "route `{path}`: `minimize` names {} categories; at most 64",
                    entry.minimize.len()
                ),
            ));
            ok = false;
        }
        if let Some(both) = entry.minimize.iter().find(|c| entry.categories.contains(c)) {
            problems.push(Problem::at(
                ROUTES_FILE,
                line,
                format!(
                    "route `{path}`: `{both}` is both needed (`categories`) and in `minimize`; a category is one or the other"
                ),
            ));
            ok = false;
        }
        for (field, category) in &entry.fields {
            if !category_known(category) {
                problems.push(Problem::at(
                    ROUTES_FILE,
                    line,
                    format!("route `{path}`: field `{field}`: unknown category `{category}`"),
                ));
                ok = false;
            }
        }
        if entry.records.as_deref().is_some_and(str::is_empty) {
            problems.push(Problem::at(
                ROUTES_FILE,
                line,
                format!("route `{path}`: `records` names no field"),
            ));
            ok = false;
        }
        let subjects = match entry.subjects.as_deref() {
            None => SubjectSource::Metadata { explicit: false },
            Some("metadata") => SubjectSource::Metadata { explicit: true },
            Some(field) => SubjectSource::Message(field.to_owned()),
        };
        if let (Some(action), true) = (action, ok) {
            routes.insert(
                path,
                Route {
                    action,
                    categories: entry.categories,
                    minimize: entry.minimize,
                    subjects,
                    fields: entry.fields,
                    records: entry.records,
                    line,
                    inspection: None,
                },
            );
        }
    }
    routes
}
