//! `routes.yaml`: what each gRPC method of the protected service does to personal data. Part
//! of the policy snapshot (and of its version): a method with no route is denied.

use super::problem::Problem;
use super::rows::Action;
use serde::Deserialize;
use std::collections::BTreeMap;

pub const ROUTES_FILE: &str = "routes.yaml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    routes: BTreeMap<String, RouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    action: String,
    categories: Vec<String>,
    #[serde(default)]
    subjects: SubjectSource,
}

/// Where the data-subject ids of a call are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectSource {
    /// The `x-data-subject` metadata, repeatable.
    #[default]
    Metadata,
}

/// One method's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub action: Action,
    pub categories: Vec<String>,
    pub subjects: SubjectSource,
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
                Some(l) => Problem::at(ROUTES_FILE, l.line(), e.to_string()),
                None => Problem::in_file(ROUTES_FILE, e.to_string()),
            });
            return BTreeMap::new();
        }
    };
    let mut routes = BTreeMap::new();
    for (path, entry) in file.routes {
        let mut ok = true;
        let well_formed = path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(service, method)| {
                !service.is_empty() && !method.is_empty() && !method.contains('/')
            });
        if !well_formed {
            problems.push(Problem::in_file(
                ROUTES_FILE,
                format!("route `{path}`: a route is a gRPC method path, `/package.Service/Method`"),
            ));
            ok = false;
        }
        let action = Action::parse(&entry.action);
        if action.is_none() {
            problems.push(Problem::in_file(
                ROUTES_FILE,
                format!(
                    "route `{path}`: unknown action `{}`; allowed: `read`, `write`, `delete`",
                    entry.action
                ),
            ));
        }
        if entry.categories.is_empty() {
            problems.push(Problem::in_file(
                ROUTES_FILE,
                format!("route `{path}`: names no category"),
            ));
            ok = false;
        }
        for c in &entry.categories {
            if !category_known(c) {
                problems.push(Problem::in_file(
                    ROUTES_FILE,
                    format!("route `{path}`: unknown category `{c}`"),
                ));
                ok = false;
            }
        }
        if let (Some(action), true) = (action, ok) {
            routes.insert(
                path,
                Route {
                    action,
                    categories: entry.categories,
                    subjects: entry.subjects,
                },
            );
        }
    }
    routes
}
