//! `model.conf`: parsed by casbin itself, then held to the one model pdgate compiles natively.

use super::problem::Problem;
use super::source::MODEL_FILE;
use casbin::{DefaultModel, Model};
use std::collections::BTreeSet;

/// The model pdgate evaluates (policy/model.conf without its comments).
pub const SUPPORTED_MODEL: &str = "\
[request_definition]
r = sub, pur, cat, act

[policy_definition]
p = sub, pur, cat, act, eft

[role_definition]
g = _, _
g2 = _, _
g3 = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = r.act == p.act && g(r.sub, p.sub) && g2(r.pur, p.pur) && g3(r.cat, p.cat)
";

/// The parts of a casbin model that decide its meaning, normalised for comparison.
#[derive(Debug, PartialEq, Eq)]
struct ModelShape {
    request: Vec<String>,
    policy: Vec<String>,
    roles: BTreeSet<(String, String)>,
    effect: String,
    matcher: BTreeSet<String>,
}

fn shape(model: &DefaultModel) -> ModelShape {
    let sections = model.get_model();
    let tokens = |sec: &str, key: &str| -> Vec<String> {
        sections
            .get(sec)
            .and_then(|s| s.get(key))
            .map(|a| a.tokens.clone())
            .unwrap_or_default()
    };
    let value = |sec: &str, key: &str| -> String {
        sections
            .get(sec)
            .and_then(|s| s.get(key))
            .map(|a| a.value.split_whitespace().collect::<String>())
            .unwrap_or_default()
    };
    let roles = sections
        .get("g")
        .map(|s| {
            s.iter()
                .map(|(k, a)| (k.clone(), a.value.split_whitespace().collect::<String>()))
                .collect()
        })
        .unwrap_or_default();
    let matcher = value("m", "m")
        .split("&&")
        .map(str::to_owned)
        .collect::<BTreeSet<_>>();
    ModelShape {
        request: tokens("r", "r"),
        policy: tokens("p", "p"),
        roles,
        effect: value("e", "e"),
        matcher,
    }
}

/// Line of the first line of `text` that starts with `key =`, for messages.
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

/// Parses `text` with casbin and checks it is the supported model; problems go to `problems`.
pub async fn check_model(text: &str, problems: &mut Vec<Problem>) {
    let model = match DefaultModel::from_str(text).await {
        Ok(m) => m,
        Err(e) => {
            problems.push(Problem::in_file(
                MODEL_FILE,
                format!("casbin cannot parse the model: {e}"),
            ));
            return;
        }
    };
    let supported = match DefaultModel::from_str(SUPPORTED_MODEL).await {
        Ok(m) => shape(&m),
        Err(e) => {
            problems.push(Problem::in_file(
                MODEL_FILE,
                format!("internal error: the supported model does not parse: {e}"),
            ));
            return;
        }
    };
    let found = shape(&model);
    let mut differs = |key: &str, what: &str, expected: &str| {
        problems.push(Problem::at(
            MODEL_FILE,
            line_of_key(text, key),
            format!(
                "{what} differs from the model pdgate evaluates; expected `{key} = {expected}`"
            ),
        ));
    };
    if found.request != supported.request {
        differs("r", "the request definition", "sub, pur, cat, act");
    }
    if found.policy != supported.policy {
        differs("p", "the policy definition", "sub, pur, cat, act, eft");
    }
    if found.roles != supported.roles {
        differs("g", "the role definitions (g, g2, g3)", "_, _");
    }
    if found.effect != supported.effect {
        differs(
            "e",
            "the policy effect",
            "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
        );
    }
    if found.matcher != supported.matcher {
        differs(
            "m",
            "the matcher",
            "r.act == p.act && g(r.sub, p.sub) && g2(r.pur, p.pur) && g3(r.cat, p.cat) (terms in any order)",
        );
    }
}
