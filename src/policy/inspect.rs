//! What pdgate reads of the protected service's messages, route by route. Compiled at load
//! from the service's own descriptors — `descriptors/` in the policy bundle: its `.proto`
//! files (compiled in-process by protox; no `protoc` at run time) or FileDescriptorSets —
//! together with the annotations in them (`proto/pdgate/v1/annotations.proto`) and what
//! `routes.yaml` says where the protos are not annotated.
//!
//! A route is read only when it needs to be: its subjects come from the request
//! (`subjects: <field>`, or a field annotated `(pdgate.v1.subject)`), or it may minimize
//! categories (`minimize`). Every other method is forwarded without decoding.
//!
//! Every problem names `routes.yaml` and the route's line; a route that trusts the caller's
//! `x-data-subject` metadata is a warning.

use super::problem::Problem;
use super::routes::{ROUTES_FILE, Route, SubjectSource};
use super::rows::Action;
use super::snapshot::{CategoryInfo, Tree};
use super::source::{DESCRIPTORS_DIR, DescriptorFile};
use crate::message::{CategorySet, FieldPlan, MessageId, MessagePlan, Plans, SubjectPath};
use prost_reflect::{
    DescriptorPool, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, Value,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The name service protos import the annotations by.
pub const ANNOTATIONS_FILE: &str = "pdgate/v1/annotations.proto";
const ANNOTATIONS_SOURCE: &str = include_str!("../../proto/pdgate/v1/annotations.proto");
const CATEGORY_OPTION: &str = "pdgate.v1.category";
const SUBJECT_OPTION: &str = "pdgate.v1.subject";
const ACTION_OPTION: &str = "pdgate.v1.action";

/// What pdgate reads and rewrites of one route's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The method's full name (`demo.customer.v1.CustomerData.GetProfile`).
    pub method: String,
    pub client_streaming: bool,
    pub server_streaming: bool,
    /// Where each request message names its subjects; `None`: the metadata does.
    pub request_subjects: Option<SubjectPath>,
    /// The plans of the response message types (the response is [`Inspection::RESPONSE`]),
    /// when the route may minimize; `None`: responses pass untouched.
    pub response: Option<Plans>,
    /// The plans of the request message types (the request is [`Inspection::REQUEST`]) on a
    /// write or delete route that may minimize: a request that sets a field of a `minimize`
    /// category makes the call need that category (granted to write it, or denied).
    pub request: Option<Plans>,
    /// The route's `minimize` categories; bit `i` of a [`CategorySet`] is `minimizable[i]`.
    pub minimizable: Vec<String>,
    /// Where each message of a server stream names the subject it is about (`records`):
    /// each is decided for that subject, and dropped when the decision is a deny. The call
    /// itself is then decided without subjects (stages 1–4), unless its request names some.
    pub records: Option<SubjectPath>,
}

impl Inspection {
    /// The id of the response message type in [`Inspection::response`].
    pub const RESPONSE: MessageId = 0;
    /// The id of the request message type in [`Inspection::request`].
    pub const REQUEST: MessageId = 0;

    /// Whether request messages are read: for their subjects, or for what a write sets.
    pub fn reads_requests(&self) -> bool {
        self.request_subjects.is_some() || self.request.is_some()
    }

    /// The bits of the `minimized` categories (names not minimizable here are ignored).
    pub fn mask<S: AsRef<str>>(&self, minimized: &[S]) -> CategorySet {
        minimized
            .iter()
            .filter_map(|m| self.minimizable.iter().position(|c| c == m.as_ref()))
            .fold(0, |mask, bit| mask | (1 << bit))
    }
}

/// Compiles the descriptors and fills in each route's [`Route::inspection`]. Problems and
/// warnings are added to the lists.
pub(crate) fn inspect_routes(
    descriptors: &[DescriptorFile],
    routes: &mut BTreeMap<String, Route>,
    categories: &Tree<CategoryInfo>,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) {
    let pool = pool(descriptors, problems);
    let options = pool.as_ref().map(Options::of);
    if let (Some(pool), Some(options)) = (&pool, &options) {
        warn_unrouted(pool, options, routes, warnings);
    }
    for (path, route) in routes.iter_mut() {
        let at = |message: String| Problem::at(ROUTES_FILE, route.line, message);
        let method = pool.as_ref().and_then(|p| find_method(p, path));
        let wants = matches!(route.subjects, SubjectSource::Message(_))
            || !route.minimize.is_empty()
            || !route.fields.is_empty()
            || route.records.is_some();
        let (Some(method), Some(options)) = (method, options.as_ref()) else {
            if wants {
                problems.push(at(match &pool {
                    None => format!(
                        "route `{path}` reads messages (`subjects: <field>`, `minimize`, `fields`) but the policy has no `{DESCRIPTORS_DIR}/` with the service's descriptors"
                    ),
                    Some(_) => format!(
                        "route `{path}`: no such method in `{DESCRIPTORS_DIR}/` (the service and method must be defined there)"
                    ),

                }));
            } else {
                warn_trusts_metadata(path, route, categories, warnings);
            }
            continue;
        };
        if let Some(action) = options.action(&method)
            && action != route.action.as_str()
        {
            problems.push(at(format!(
                "route `{path}`: routes.yaml says action `{}`, the method's annotation `({ACTION_OPTION})` says `{action}`",
                route.action.as_str()
            )));
        }
        let before = problems.len();
        let request_subjects = request_subjects(path, route, &method, options, problems);
        let records = records(path, route, &method, problems);
        if request_subjects.is_none() && records.is_none() {
            warn_trusts_metadata(path, route, categories, warnings);
        }
        let (response, request) = if route.minimize.is_empty() {
            // Nothing is cleared: every category the messages carry must be one the call is
            // decided for, or the call hands out (or writes) data no decision covered.
            check_undecided(
                path,
                route,
                options,
                categories,
                (&method.output(), "response"),
                problems,
            );
            if route.action != Action::Read {
                check_undecided(
                    path,
                    route,
                    options,
                    categories,
                    (&method.input(), "request"),
                    problems,
                );
            }
            (None, None)
        } else {
            let mut planner = Planner {
                path,
                route,
                options,
                categories,
                by_field: fields_by_path(path, route, &method.output(), problems),
                plans: Plans::default(),
                ids: HashMap::new(),
                carried: vec![false; route.minimize.len()],
                problems,
            };
            let response = planner.plan(&method.output());
            // A write's request is read for the categories it sets (annotations only:
            // routes.yaml's `fields` are response fields).
            let request = (route.action != Action::Read).then(|| {
                planner.by_field.clear();
                planner.plan(&method.input())
            });
            planner.report_uncarried();
            (Some(response), request)
        };
        if problems.len() > before
            || (request_subjects.is_none() && response.is_none() && records.is_none())
        {
            continue;
        }
        route.inspection = Some(Arc::new(Inspection {
            method: method.full_name().to_owned(),
            client_streaming: method.is_client_streaming(),
            server_streaming: method.is_server_streaming(),
            request_subjects,
            response,
            request,
            minimizable: route.minimize.clone(),
            records,
        }));
    }
}

/// A method its service annotates with an action but `routes.yaml` does not route: every call
/// of it is denied (`ROUTE_UNKNOWN`), which the service team most likely did not mean.
fn warn_unrouted(
    pool: &DescriptorPool,
    options: &Options,
    routes: &BTreeMap<String, Route>,
    warnings: &mut Vec<Problem>,
) {
    for service in pool.services() {
        for method in service.methods() {
            let path = format!("/{}/{}", service.full_name(), method.name());
            if let (Some(action), false) = (options.action(&method), routes.contains_key(&path)) {
                warnings.push(Problem::in_file(
                    ROUTES_FILE,
                    format!(
                        "method `{path}` is annotated `({ACTION_OPTION}) = \"{action}\"` in `{DESCRIPTORS_DIR}/{}` but has no route: every call of it is denied (`ROUTE_UNKNOWN`); `pdgate routes generate` writes one",
                        method.parent_file().name()
                    ),
                ));
            }
        }
    }
}

/// A route on identified data whose subjects come from the caller's metadata: a warning (on
/// de-identified data no subject's state applies, so there is nothing to trust).
fn warn_trusts_metadata(
    path: &str,
    route: &Route,
    categories: &Tree<CategoryInfo>,
    warnings: &mut Vec<Problem>,
) {
    let identified = route.categories.iter().any(|c| {
        categories
            .id(c)
            .is_none_or(|id| !categories.info(id).deidentified)
    });
    if let (SubjectSource::Metadata { explicit }, true) = (&route.subjects, identified) {
        let explicit = *explicit;
        warnings.push(Problem::at(
            ROUTES_FILE,
            route.line,
            format!(
                "route `{path}` takes its subjects from the caller's `x-data-subject` metadata{}: pdgate decides on what the caller says, not on whose record the message asks for; name the request field (`subjects: <field>`, with the service's descriptors in `{DESCRIPTORS_DIR}/`)",
                if explicit {
                    " (`subjects: metadata`)"
                } else {
                    ""
                }
            ),
        ));
    }
}

/// The descriptors as one pool: `.proto` files compiled together (they may import each
/// other, `google/protobuf/*` and the pdgate annotations), and FileDescriptorSets added.
pub(crate) fn pool(
    files: &[DescriptorFile],
    problems: &mut Vec<Problem>,
) -> Option<DescriptorPool> {
    if files.is_empty() {
        return None;
    }
    let where_ = |name: &str| format!("{DESCRIPTORS_DIR}/{name}");
    let mut sources = BTreeMap::new();
    let mut sets = Vec::new();
    for file in files {
        if file.name.ends_with(".proto") {
            match std::str::from_utf8(&file.content) {
                Ok(text) => {
                    sources.insert(file.name.clone(), text.to_owned());
                }
                Err(_) => problems.push(Problem::in_file(&where_(&file.name), "is not UTF-8 text")),
            }
        } else if [".binpb", ".pb", ".desc"]
            .iter()
            .any(|ext| file.name.ends_with(ext))
        {
            sets.push(file);
        } else {
            problems.push(Problem::in_file(
                &where_(&file.name),
                "is neither a `.proto` file nor a FileDescriptorSet (`.binpb`, `.pb`, `.desc`)",
            ));
        }
    }
    let mut pool = if sources.is_empty() {
        DescriptorPool::new()
    } else {
        let names: Vec<String> = sources.keys().cloned().collect();
        let mut resolver = protox::file::ChainFileResolver::new();
        resolver.add(Sources(sources));
        resolver.add(protox::file::GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        if let Err(e) = compiler.open_files(&names) {
            problems.push(Problem::in_file(
                &where_(e.file().unwrap_or("")),
                format!("does not compile: {e}"),
            ));
            return None;
        }
        compiler.descriptor_pool()
    };
    for set in sets {
        if let Err(e) = pool.decode_file_descriptor_set(set.content.as_slice()) {
            problems.push(Problem::in_file(
                &where_(&set.name),
                format!("is not a FileDescriptorSet pdgate can use: {e}"),
            ));
        }
    }
    Some(pool)
}

/// The bundle's `.proto` files by name, and the pdgate annotations.
struct Sources(BTreeMap<String, String>);

impl protox::file::FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        match self.0.get(name) {
            Some(text) => protox::file::File::from_source(name, text),
            None if name == ANNOTATIONS_FILE => {
                protox::file::File::from_source(name, ANNOTATIONS_SOURCE)
            }
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// `/pkg.Service/Method` in the pool.
fn find_method(pool: &DescriptorPool, path: &str) -> Option<MethodDescriptor> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    pool.get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)
}

/// The pdgate annotations, as the pool defines them (absent when no file imports them).
pub(crate) struct Options {
    category: Option<ExtensionDescriptor>,
    subject: Option<ExtensionDescriptor>,
    action: Option<ExtensionDescriptor>,
}

impl Options {
    pub(crate) fn of(pool: &DescriptorPool) -> Self {
        Self {
            category: pool.get_extension_by_name(CATEGORY_OPTION),
            subject: pool.get_extension_by_name(SUBJECT_OPTION),
            action: pool.get_extension_by_name(ACTION_OPTION),
        }
    }

    pub(crate) fn category(&self, field: &FieldDescriptor) -> Option<String> {
        let ext = self.category.as_ref()?;
        let options = field.options();
        if !options.has_extension(ext) {
            return None;
        }
        match options.get_extension(ext).as_ref() {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        }
    }

    pub(crate) fn is_subject(&self, field: &FieldDescriptor) -> bool {
        self.subject.as_ref().is_some_and(|ext| {
            let options = field.options();
            options.has_extension(ext)
                && matches!(options.get_extension(ext).as_ref(), Value::Bool(true))
        })
    }

    pub(crate) fn action(&self, method: &MethodDescriptor) -> Option<String> {
        let ext = self.action.as_ref()?;
        let options = method.options();
        if !options.has_extension(ext) {
            return None;
        }
        match options.get_extension(ext).as_ref() {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        }
    }
}

/// Where the request names its subjects: the route's field path, or the annotated field; the
/// two must agree when both are given. `None`: from the metadata.
fn request_subjects(
    path: &str,
    route: &Route,
    method: &MethodDescriptor,
    options: &Options,
    problems: &mut Vec<Problem>,
) -> Option<SubjectPath> {
    let input = method.input();
    let annotated: Vec<FieldDescriptor> =
        input.fields().filter(|f| options.is_subject(f)).collect();
    let at = |message: String| Problem::at(ROUTES_FILE, route.line, message);
    match &route.subjects {
        SubjectSource::Message(field_path) => {
            let resolved = match resolve_ids(&input, field_path) {
                Ok(fields) => fields,
                Err(e) => {
                    problems.push(at(format!("route `{path}`: `subjects: {field_path}`: {e}")));
                    return None;
                }
            };
            let last = resolved.last()?;
            if !annotated.is_empty() && !annotated.iter().any(|f| resolved.len() == 1 && f == last)
            {
                problems.push(at(format!(
                    "route `{path}`: routes.yaml says the subjects are `{field_path}`, the annotations `({SUBJECT_OPTION})` say `{}`",
                    names(&annotated)
                )));
                return None;
            }
            Some(SubjectPath(
                resolved.iter().map(FieldDescriptor::number).collect(),
            ))
        }
        SubjectSource::Metadata { explicit: true } => None,
        SubjectSource::Metadata { explicit: false } => match annotated.as_slice() {
            [] => None,
            [one] if one.kind() == Kind::String => Some(SubjectPath(vec![one.number()])),
            [one] => {
                problems.push(at(format!(
                    "route `{path}`: `{}` is annotated `({SUBJECT_OPTION})` but is a {:?} field; subject ids are strings",
                    one.full_name(),
                    one.kind()
                )));
                None
            }
            more => {
                problems.push(at(format!(
                    "route `{path}`: several request fields are annotated `({SUBJECT_OPTION})` ({}); name the one in routes.yaml (`subjects: <field>`)",
                    names(more)
                )));
                None
            }
        },
    }
}

/// Where each message of a server stream names its subject (`records: <response field>`).
fn records(
    path: &str,
    route: &Route,
    method: &MethodDescriptor,
    problems: &mut Vec<Problem>,
) -> Option<SubjectPath> {
    let field_path = route.records.as_deref()?;
    let at = |message: String| Problem::at(ROUTES_FILE, route.line, message);
    if !method.is_server_streaming() {
        problems.push(at(format!(
            "route `{path}`: `records: {field_path}` needs a server-streaming method (each streamed message is one record); `{}` answers with one message",
            method.name()
        )));
        return None;
    }
    match resolve_ids(&method.output(), field_path) {
        Ok(fields) => Some(SubjectPath(
            fields.iter().map(FieldDescriptor::number).collect(),
        )),
        Err(e) => {
            problems.push(at(format!("route `{path}`: `records: {field_path}`: {e}")));
            None
        }
    }
}

/// The fields along `path`, which must end in a string field: subject ids are strings.
fn resolve_ids(message: &MessageDescriptor, path: &str) -> Result<Vec<FieldDescriptor>, String> {
    let fields = resolve(message, path)?;
    match fields.last() {
        Some(last) if last.kind() != Kind::String => Err(format!(
            "is a {:?} field; subject ids are strings",
            last.kind()
        )),
        _ => Ok(fields),
    }
}

fn names(fields: &[FieldDescriptor]) -> String {
    fields
        .iter()
        .map(|f| format!("`{}`", f.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fields along `path` (`updates[].customer_id`, `profile.email`) from `message`. Each
/// step but the last must be a message field; `[]` marks a repeated step and must match it.
fn resolve(message: &MessageDescriptor, path: &str) -> Result<Vec<FieldDescriptor>, String> {
    let mut fields = Vec::new();
    let mut current = message.clone();
    let steps: Vec<&str> = path.split('.').collect();
    for (i, step) in steps.iter().enumerate() {
        let (name, marked_repeated) = match step.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (*step, false),
        };
        let field = current.get_field_by_name(name).ok_or_else(|| {
            format!(
                "message `{}` has no field `{name}` (it has {})",
                current.full_name(),
                current
                    .fields()
                    .map(|f| format!("`{}`", f.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if marked_repeated && !field.is_list() {
            return Err(format!("`{name}` is not a repeated field; drop the `[]`"));
        }
        let last = i + 1 == steps.len();
        if !last {
            match field.kind() {
                Kind::Message(inner) if !field.is_map() => current = inner,
                _ => {
                    return Err(format!(
                        "`{name}` is not a message field; the path cannot go into it"
                    ));
                }
            }
        }
        fields.push(field);
    }
    Ok(fields)
}

/// The categories routes.yaml gives response fields (`fields:`), by (message, field number).
fn fields_by_path(
    path: &str,
    route: &Route,
    output: &MessageDescriptor,
    problems: &mut Vec<Problem>,
) -> HashMap<(String, u32), String> {
    let mut by_field = HashMap::new();
    for (field_path, category) in &route.fields {
        match resolve(output, field_path) {
            Ok(fields) => {
                if let Some(last) = fields.last() {
                    by_field.insert(
                        (last.parent_message().full_name().to_owned(), last.number()),
                        category.clone(),
                    );
                }
            }
            Err(e) => problems.push(Problem::at(
                ROUTES_FILE,
                route.line,
                format!("route `{path}`: `fields: {field_path}`: {e}"),
            )),
        }
    }
    by_field
}

/// Builds the plans of a route's message types.
struct Planner<'a> {
    path: &'a str,
    route: &'a Route,
    options: &'a Options,
    categories: &'a Tree<CategoryInfo>,
    by_field: HashMap<(String, u32), String>,
    plans: Plans,
    ids: HashMap<String, MessageId>,
    /// Whether some field carries each minimizable category.
    carried: Vec<bool>,
    problems: &'a mut Vec<Problem>,
}

impl Planner<'_> {
    /// The plans of `root` (id 0) and the types inside it.
    fn plan(&mut self, root: &MessageDescriptor) -> Plans {
        self.ids.clear();
        self.message(root);
        std::mem::take(&mut self.plans)
    }

    /// A `minimize` category no planned field carries is a problem: nothing would ever be
    /// cleared (or refused) for it.
    fn report_uncarried(self) {
        for (i, carried) in self.carried.iter().enumerate() {
            if !carried {
                self.problems.push(Problem::at(
                    ROUTES_FILE,
                    self.route.line,
                    format!(
                        "route `{}`: `minimize` names `{}`, but no response field carries it (annotate the field `({CATEGORY_OPTION})` or map it in `fields`)",
                        self.path, self.route.minimize[i]
                    ),
                ));
            }
        }
    }

    fn message(&mut self, message: &MessageDescriptor) -> MessageId {
        if let Some(id) = self.ids.get(message.full_name()) {
            return *id;
        }
        // A placeholder first: a type whose fields refer back to it finds its own id.
        let id = self.plans.push(MessagePlan::default());
        self.ids.insert(message.full_name().to_owned(), id);
        let mut fields = Vec::new();
        for field in message.fields() {
            let plan = match self.category(&field) {
                Some(category) => self.classify(&field, &category),
                None => match field.kind() {
                    Kind::Message(inner) => FieldPlan::Nested(self.message(&inner)),
                    _ => FieldPlan::Keep,
                },
            };
            fields.push((field.number(), plan));
        }
        self.plans
            .set(id, MessagePlan::new(message.full_name(), fields));
        id
    }

    /// The field's category: its annotation, or routes.yaml's `fields`; both, they agree.
    fn category(&mut self, field: &FieldDescriptor) -> Option<String> {
        let annotated = self.options.category(field);
        let mapped = self
            .by_field
            .get(&(
                field.parent_message().full_name().to_owned(),
                field.number(),
            ))
            .cloned();
        match (annotated, mapped) {
            (Some(a), Some(m)) if a != m => {
                self.problems.push(Problem::at(
                    ROUTES_FILE,
                    self.route.line,
                    format!(
                        "route `{}`: routes.yaml gives `{}` the category `{m}`, its annotation `({CATEGORY_OPTION})` says `{a}`",
                        self.path,
                        field.full_name()
                    ),
                ));
                None
            }
            (a, m) => a.or(m),
        }
    }

    /// A categorized field: kept when the route needs its category, cleared by its bit when
    /// the route may minimize it; any other category is a problem (the call would hand out
    /// data it was never decided for).
    fn classify(&mut self, field: &FieldDescriptor, category: &str) -> FieldPlan {
        let Some(id) = self.categories.id(category) else {
            self.problems.push(Problem::at(
                ROUTES_FILE,
                self.route.line,
                format!(
                    "route `{}`: field `{}` has the category `{category}`, which taxonomy.toml does not define",
                    self.path,
                    field.full_name()
                ),
            ));
            return FieldPlan::Keep;
        };
        let within = |names: &[String]| {
            names.iter().position(|n| {
                self.categories
                    .id(n)
                    .is_some_and(|outer| self.categories.is_within(id, outer))
            })
        };
        if within(&self.route.categories).is_some() {
            return FieldPlan::Keep;
        }
        if let Some(bit) = within(&self.route.minimize) {
            self.carried[bit] = true;
            return FieldPlan::Category(u8::try_from(bit).unwrap_or(u8::MAX));
        }
        self.problems.push(Problem::at(
            ROUTES_FILE,
            self.route.line,
            format!(
                "route `{}`: field `{}` carries `{category}`, which the route neither needs (`categories`) nor may minimize (`minimize`)",
                self.path,
                field.full_name()
            ),
        ));
        FieldPlan::Keep
    }
}

/// The annotated categories of `message`'s fields and of the messages inside it, with the
/// full name of the field that carries each, in field order. A field with a category is not
/// walked into; a message type that contains itself is walked once.
pub(crate) fn annotated_categories(
    message: &MessageDescriptor,
    options: &Options,
) -> Vec<(String, String)> {
    fn walk(
        message: &MessageDescriptor,
        options: &Options,
        seen: &mut Vec<String>,
        found: &mut Vec<(String, String)>,
    ) {
        if seen.iter().any(|s| s == message.full_name()) {
            return;
        }
        seen.push(message.full_name().to_owned());
        for field in message.fields() {
            if let Some(category) = options.category(&field) {
                found.push((field.full_name().to_owned(), category));
            } else if let Kind::Message(inner) = field.kind() {
                walk(&inner, options, seen, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(message, options, &mut Vec::new(), &mut found);
    found
}

/// On a route that minimizes nothing, every annotated field of `message` must carry a
/// category the route needs (`categories`): pdgate forwards such messages untouched, so a
/// field of any other category would pass without a decision for it.
fn check_undecided(
    path: &str,
    route: &Route,
    options: &Options,
    categories: &Tree<CategoryInfo>,
    (message, side): (&MessageDescriptor, &str),
    problems: &mut Vec<Problem>,
) {
    let at = |message: String| Problem::at(ROUTES_FILE, route.line, message);
    for (field, category) in annotated_categories(message, options) {
        let Some(id) = categories.id(&category) else {
            problems.push(at(format!(
                "route `{path}`: field `{field}` has the category `{category}`, which taxonomy.toml does not define"
            )));
            continue;
        };
        let needed = route.categories.iter().any(|n| {
            categories
                .id(n)
                .is_some_and(|outer| categories.is_within(id, outer))
        });
        if !needed {
            let verb = if side == "request" {
                "write"
            } else {
                "hand out"
            };
            problems.push(at(format!(
                "route `{path}`: {side} field `{field}` carries `{category}`, which the route does not name: the call would {verb} it without a decision for it; add it to `categories` (needed), or to `minimize` (cleared when the purpose may not have it)"
            )));
        }
    }
}
