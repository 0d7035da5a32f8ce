//! Cedar authorization at the edge (`authorization` + `policy.authorize`): each request of a
//! route becomes a Cedar request — principal from the verified token, action from the method
//! and operation, resource from the path parameters, context from the token's scopes and
//! chosen query and body values — decided by the `cedar-policy` crate in process, as Amazon
//! Verified Permissions would decide it.
//!
//! What is decided here, around Cedar:
//! - errors fail closed: a request or entity that does not fit the schema, or a policy whose
//!   evaluation errors, is a refusal (Cedar itself skips an erroring policy, so a `forbid`
//!   that errors would otherwise let a `permit` through);
//! - request values become Cedar values by construction ([`to_cedar`]), never through Cedar's
//!   JSON entity syntax, so a body member such as `{"__entity": …}` cannot forge an entity
//!   reference;
//! - policy ids are the `@id("…")` annotation, else `FILE:policyN`: the decision log names
//!   the policies that determined a decision.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicyId, PolicySet, RestrictedExpression, Schema, ValidationMode, Validator,
};
use http::Method;
use serde_json::{Map, Value};

use crate::pipeline::{Block, BlockDetails, Decision, Eval, Needs, Notes, Stage, StageKind};
use crate::request::Request;
use crate::schema::operations::PathTemplate;

/// A template over named values: `{iss}|{sub}`, `{id}`.
#[derive(Debug, Clone)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Var(String),
}

impl Template {
    /// Parses `text{name}text`; `{{` is not special (ids rarely hold braces).
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            let end = rest[start..]
                .find('}')
                .map(|e| start + e)
                .ok_or_else(|| format!("template {text:?}: unclosed `{{`"))?;
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_string()));
            }
            let name = &rest[start + 1..end];
            if name.is_empty() {
                return Err(format!("template {text:?}: empty `{{}}`"));
            }
            pieces.push(Piece::Var(name.to_string()));
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template { pieces })
    }

    /// The names it uses.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// The text with each name replaced; `None` when a value is missing.
    pub fn render<'v>(&self, get: impl Fn(&str) -> Option<Cow<'v, str>>) -> Option<String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => out.push_str(&get(v)?),
            }
        }
        Some(out)
    }
}

/// A JSON value as a Cedar value: strings, integers, booleans, arrays (sets) and objects
/// (records). Numbers that are not 64-bit integers become their text; `null` is no value
/// (`Ok(None)`; a null member or element is left out). Built by hand, not with Cedar's JSON
/// parser, which reads `{"__entity": …}` and `{"__extn": …}` specially: request data must
/// never name an entity.
///
/// A value nested deeper than 32 levels is an error, never truncated: a member a policy
/// tests must not silently vanish (the caller refuses the request).
pub fn to_cedar(v: &Value) -> Result<Option<RestrictedExpression>, String> {
    to_cedar_at(v, 0)
}

const MAX_DEPTH: usize = 32;

fn to_cedar_at(v: &Value, depth: usize) -> Result<Option<RestrictedExpression>, String> {
    if depth > MAX_DEPTH {
        return Err(format!("a value nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => RestrictedExpression::new_long(i),
            None => RestrictedExpression::new_string(n.to_string()),
        },
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Array(a) => {
            let mut items = Vec::with_capacity(a.len());
            for x in a {
                items.extend(to_cedar_at(x, depth + 1)?);
            }
            RestrictedExpression::new_set(items)
        }
        Value::Object(o) => {
            let mut members = Vec::with_capacity(o.len());
            for (k, x) in o {
                if let Some(e) = to_cedar_at(x, depth + 1)? {
                    members.push((k.clone(), e));
                }
            }
            RestrictedExpression::new_record(members).map_err(|e| e.to_string())?
        }
    }))
}

/// A problem loading the policies or the schema: in one of their files (with a position when
/// Cedar gives one) or in the config (`file: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The policy or schema file.
    pub file: Option<PathBuf>,
    /// 1-based line (0: unknown).
    pub line: u64,
    /// 1-based column (0: unknown).
    pub column: u64,
    /// What is wrong.
    pub message: String,
}

impl LoadError {
    fn config(message: String) -> LoadError {
        LoadError {
            file: None,
            line: 0,
            column: 0,
            message,
        }
    }

    /// An error of `file` at the first labelled position of a Cedar diagnostic.
    fn diagnostic(file: &Path, text: &str, d: &dyn miette::Diagnostic, message: String) -> Self {
        let offset = d.labels().and_then(|mut l| l.next()).map(|l| l.offset());
        let (line, column) = offset.map_or((0, 0), |o| line_col(text, o));
        LoadError {
            file: Some(file.to_path_buf()),
            line,
            column,
            message,
        }
    }
}

fn line_col(text: &str, offset: usize) -> (u64, u64) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line as u64, col as u64)
}

/// Everything Cedar's messages say, causes included, on one line.
fn full_message(e: &dyn std::error::Error, d: Option<&dyn miette::Diagnostic>) -> String {
    let mut m = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        m.push_str(": ");
        m.push_str(&s.to_string());
        src = s.source();
    }
    if let Some(help) = d.and_then(miette::Diagnostic::help) {
        m.push_str(" (");
        m.push_str(&help.to_string());
        m.push(')');
    }
    m
}

/// What an [`Authorizer`] is built from (paths resolved).
pub struct AuthorizerSpec<'a> {
    /// Policy files.
    pub policy_files: Vec<PathBuf>,
    /// Schema file.
    pub schema_file: Option<PathBuf>,
    /// Principal entity type.
    pub principal_type: &'a str,
    /// Principal id template (default `{sub}`).
    pub principal_id: Option<&'a str>,
    /// Group claim and entity type.
    pub groups: Option<(&'a str, &'a str)>,
    /// Attribute ← claim.
    pub attributes: &'a BTreeMap<String, String>,
    /// Action entity type.
    pub action_type: Option<&'a str>,
}

/// The compiled policies, schema and principal mapping (top-level `authorization`).
pub struct Authorizer {
    policies: PolicySet,
    /// The policies that can apply to each action, by action id: Cedar evaluates every
    /// policy it is given, so a decision over the slice (2 of the example's 11 policies for
    /// a typical operation) costs a third of one over the whole set, with the same result.
    slices: HashMap<String, PolicySet>,
    /// With a schema: for each action id, an entity store holding that action's entity (its
    /// action groups as ancestors). A request's principal and resource are added to it and
    /// checked against the schema, instead of building a store with every action of the
    /// schema and computing the closure over all of them (a third of a decision's time under
    /// load, by profile).
    action_entities: HashMap<String, Entities>,
    /// The slice of an action no policy names: the policies with an unconstrained action.
    unnamed: PolicySet,
    schema: Option<Schema>,
    engine: cedar_policy::Authorizer,
    principal_type: EntityTypeName,
    principal_id: Template,
    groups: Option<(String, EntityTypeName)>,
    attributes: Vec<(String, String)>,
    action_type: EntityTypeName,
    /// The namespace of the principal type (`App`), for default type names.
    namespace: String,
    /// Action ids the schema declares (`None`: no schema).
    declared_actions: Option<HashSet<String>>,
    declared_types: Option<HashSet<String>>,
    /// Unique per load: cached decisions of an older load never match.
    id: u64,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("policies", &self.policies.policies().count())
            .field("schema", &self.schema.is_some())
            .field("principal_type", &self.principal_type.to_string())
            .finish_non_exhaustive()
    }
}

fn type_name(s: &str, what: &str) -> Result<EntityTypeName, LoadError> {
    EntityTypeName::from_str(s.trim()).map_err(|e| {
        LoadError::config(format!(
            "authorization: {what} {s:?} is not a Cedar entity type name: {}",
            full_message(&e, Some(&e))
        ))
    })
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|e| LoadError {
        file: Some(path.to_path_buf()),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })
}

impl Authorizer {
    /// Loads and checks the policies (and the schema: strict validation).
    pub fn load(spec: &AuthorizerSpec<'_>) -> Result<Authorizer, Vec<LoadError>> {
        let mut errors = Vec::new();
        let principal_type = type_name(spec.principal_type, "principal.type");
        let groups = spec
            .groups
            .map(|(claim, ty)| {
                type_name(ty, "principal.groups.type").map(|t| (claim.to_string(), t))
            })
            .transpose();
        let namespace = spec
            .principal_type
            .rsplit_once("::")
            .map(|(ns, _)| ns.to_string())
            .unwrap_or_default();
        let default_action = if namespace.is_empty() {
            "Action".to_string()
        } else {
            format!("{namespace}::Action")
        };
        let action_type = type_name(spec.action_type.unwrap_or(&default_action), "action_type");
        let principal_id = Template::parse(spec.principal_id.unwrap_or("{sub}"))
            .map_err(|e| LoadError::config(format!("authorization: principal.id: {e}")));
        let (principal_type, groups, action_type, principal_id) =
            match (principal_type, groups, action_type, principal_id) {
                (Ok(p), Ok(g), Ok(a), Ok(i)) => (Some(p), g, Some(a), Some(i)),
                (p, g, a, i) => {
                    errors.extend(p.err());
                    errors.extend(g.err());
                    errors.extend(a.err());
                    errors.extend(i.err());
                    (None, None, None, None)
                }
            };
        let schema = match &spec.schema_file {
            None => None,
            Some(path) => match read(path) {
                Err(e) => {
                    errors.push(e);
                    None
                }
                Ok(text) => {
                    let parsed = if path.extension().is_some_and(|e| e == "json") {
                        Schema::from_json_str(&text).map_err(|e| {
                            LoadError::diagnostic(path, &text, &e, full_message(&e, Some(&e)))
                        })
                    } else {
                        Schema::from_cedarschema_str(&text)
                            .map(|(s, _warnings)| s)
                            .map_err(|e| {
                                LoadError::diagnostic(path, &text, &e, full_message(&e, Some(&e)))
                            })
                    };
                    match parsed {
                        Ok(s) => Some(s),
                        Err(e) => {
                            errors.push(e);
                            None
                        }
                    }
                }
            },
        };
        let mut policies = PolicySet::new();
        // Each file's text, to locate validation errors (policy id → file).
        let mut origin: HashMap<PolicyId, (PathBuf, Arc<str>)> = HashMap::new();
        if spec.policy_files.is_empty() {
            errors.push(LoadError::config(
                "authorization.policies: list at least one Cedar policy file".into(),
            ));
        }
        for path in &spec.policy_files {
            let text: Arc<str> = match read(path) {
                Ok(t) => t.into(),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let set = match PolicySet::from_str(&text) {
                Ok(s) => s,
                Err(e) => {
                    for one in e.iter() {
                        errors.push(LoadError::diagnostic(
                            path,
                            &text,
                            one,
                            full_message(one, Some(one)),
                        ));
                    }
                    continue;
                }
            };
            if set.templates().next().is_some() {
                errors.push(LoadError {
                    file: Some(path.clone()),
                    line: 0,
                    column: 0,
                    message: "policy templates (`?principal`, `?resource`) are not supported: \
                              write static policies"
                        .into(),
                });
                continue;
            }
            let file_name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into(),
            );
            // Cedar numbers a file's policies policy0, policy1, … in source order.
            let mut in_file: Vec<&cedar_policy::Policy> = set.policies().collect();
            in_file.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<u64>()
                    .unwrap_or(u64::MAX)
            });
            for p in in_file {
                let id = match p.annotation("id") {
                    Some(a) => a.to_string(),
                    None => format!("{file_name}:{}", p.id()),
                };
                let id = PolicyId::new(id);
                let renamed = p.new_id(id.clone());
                if policies.add(renamed).is_err() {
                    errors.push(LoadError {
                        file: Some(path.clone()),
                        line: 0,
                        column: 0,
                        message: format!("two policies have the id {:?}", id.to_string()),
                    });
                    continue;
                }
                origin.insert(id, (path.clone(), Arc::clone(&text)));
            }
        }
        if let Some(s) = &schema {
            let result = Validator::new(s.clone()).validate(&policies, ValidationMode::Strict);
            for e in result.validation_errors() {
                let message = format!(
                    "policy {:?} does not fit the schema: {}",
                    e.policy_id().to_string(),
                    full_message(e, Some(e))
                );
                match origin.get(e.policy_id()) {
                    Some((path, text)) => {
                        errors.push(LoadError::diagnostic(path, text, e, message));
                    }
                    None => errors.push(LoadError::config(message)),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let (Some(principal_type), Some(action_type), Some(principal_id)) =
            (principal_type, action_type, principal_id)
        else {
            return Err(errors);
        };
        // The schema's actions with their action groups as ancestors (closure computed).
        let schema_actions = match schema.as_ref().map(Schema::action_entities).transpose() {
            Ok(all) => all,
            Err(e) => return Err(vec![LoadError::config(format!("schema actions: {e}"))]),
        };
        let action_entities = schema_actions
            .iter()
            .flat_map(|a| a.iter())
            .filter(|e| e.uid().type_name() == &action_type)
            .filter_map(|e| {
                let one = Entities::from_entities([e.clone()], None).ok()?;
                Some((e.uid().id().unescaped().to_string(), one))
            })
            .collect();
        let (slices, unnamed) = match slice(
            &policies,
            schema.as_ref(),
            schema_actions.as_ref(),
            &action_type,
        ) {
            Ok(x) => x,
            Err(e) => return Err(vec![LoadError::config(e)]),
        };
        let declared_actions = schema.as_ref().map(|s| {
            s.actions()
                .map(|a| a.id().unescaped().to_string())
                .collect()
        });
        let declared_types = schema
            .as_ref()
            .map(|s| s.entity_types().map(ToString::to_string).collect());
        let me = Authorizer {
            policies,
            slices,
            action_entities,
            unnamed,
            schema,
            engine: cedar_policy::Authorizer::new(),
            principal_type,
            principal_id,
            groups,
            attributes: spec
                .attributes
                .iter()
                .map(|(a, c)| (a.clone(), c.clone()))
                .collect(),
            action_type,
            namespace,
            declared_actions,
            declared_types,
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        };
        let mut type_errors = Vec::new();
        me.check_type(
            &me.principal_type.to_string(),
            "principal.type",
            &mut type_errors,
        );
        if let Some((_, g)) = &me.groups {
            me.check_type(&g.to_string(), "principal.groups.type", &mut type_errors);
        }
        if !type_errors.is_empty() {
            return Err(type_errors.into_iter().map(LoadError::config).collect());
        }
        Ok(me)
    }

    fn check_type(&self, ty: &str, what: &str, errors: &mut Vec<String>) {
        if let Some(types) = &self.declared_types {
            if !types.contains(ty) {
                let mut known: Vec<&String> = types.iter().collect();
                known.sort();
                errors.push(format!(
                    "authorization: {what} {ty:?} is not an entity type of the schema (it has: {})",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }

    /// Number of policies.
    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }

    /// The default entity type for `name` in the principal's namespace (`App::Route`).
    pub fn qualified(&self, name: &str) -> String {
        if self.namespace.is_empty() {
            name.to_string()
        } else {
            format!("{}::{name}", self.namespace)
        }
    }

    /// Whether the schema (if any) declares this action id.
    pub fn action_declared(&self, id: &str) -> bool {
        self.declared_actions
            .as_ref()
            .is_none_or(|a| a.contains(id))
    }

    /// Whether the schema (if any) declares this entity type.
    pub fn type_declared(&self, ty: &str) -> bool {
        self.declared_types.as_ref().is_none_or(|t| t.contains(ty))
    }

    /// Decides one request. `resource` is the resource entity; `context` the record's
    /// members besides `scopes`.
    ///
    /// `context_key` is the text of every context value (see [`RouteAuthz::request_context`]);
    /// with it, the decision is looked up in and stored to the per-thread decision cache.
    pub fn decide(
        &self,
        claims: &Map<String, Value>,
        action: &str,
        resource: &ResourceInstance,
        context: Vec<(String, RestrictedExpression)>,
        context_key: Option<&str>,
    ) -> Verdict {
        let claim = |name: &str| claim_text(claims, name);
        let Some(pid) = self.principal_id.render(claim) else {
            return Verdict::Error(format!(
                "the token lacks a claim of the principal id template ({})",
                self.principal_id.vars().collect::<Vec<_>>().join(", ")
            ));
        };
        let Some(context_key) = context_key else {
            return self.evaluate(claims, pid, action, resource, context);
        };
        // Everything the decision depends on, each part length-prefixed (no two inputs
        // make the same key): the principal (id, groups, attribute claims, scopes), the
        // action, the resource (uid and attributes) and the context values.
        let mut key = String::with_capacity(256);
        let mut part = |s: &str| {
            let _ = write!(key, "{}:", s.len());
            key.push_str(s);
        };
        part(&pid);
        if let Some((claim, _)) = &self.groups {
            for g in claim_list(claims, claim) {
                part(&g);
            }
        }
        part("\u{1}");
        for (_, c) in &self.attributes {
            match claims.get(c) {
                Some(v) => part(&v.to_string()),
                None => part(""),
            }
        }
        for s in crate::auth::scopes_of(claims) {
            part(s);
        }
        part("\u{1}");
        part(action);
        part(&resource.key);
        part(context_key);
        if let Some(v) = decisions::lookup(self.id, &key) {
            return v;
        }
        let v = self.evaluate(claims, pid, action, resource, context);
        if !matches!(v, Verdict::Error(_)) {
            decisions::insert(self.id, key, &v);
        }
        v
    }

    /// The Cedar decision, uncached.
    fn evaluate(
        &self,
        claims: &Map<String, Value>,
        pid: String,
        action: &str,
        resource: &ResourceInstance,
        mut context: Vec<(String, RestrictedExpression)>,
    ) -> Verdict {
        let principal =
            EntityUid::from_type_name_and_id(self.principal_type.clone(), EntityId::new(pid));
        let mut parents = HashSet::new();
        if let Some((claim, ty)) = &self.groups {
            for g in claim_list(claims, claim) {
                parents.insert(EntityUid::from_type_name_and_id(
                    ty.clone(),
                    EntityId::new(g),
                ));
            }
        }
        let mut attrs = HashMap::with_capacity(self.attributes.len());
        for (a, c) in &self.attributes {
            match claims.get(c).map(to_cedar).transpose() {
                Ok(v) => {
                    if let Some(v) = v.flatten() {
                        attrs.insert(a.clone(), v);
                    }
                }
                Err(e) => return Verdict::Error(format!("claim {c:?}: {e}")),
            }
        }
        let principal_entity = match Entity::new(principal.clone(), attrs, parents) {
            Ok(e) => e,
            Err(e) => return Verdict::Error(format!("principal: {}", full_message(&e, None))),
        };
        let resource_entity =
            match Entity::new(resource.uid.clone(), resource.attrs.clone(), HashSet::new()) {
                Ok(e) => e,
                Err(e) => return Verdict::Error(format!("resource: {}", full_message(&e, None))),
            };
        let mut request_entities = vec![principal_entity];
        if principal != resource.uid {
            request_entities.push(resource_entity);
        }
        let entities = match (&self.schema, self.action_entities.get(action)) {
            // Checked against the schema as `from_entities` would, without its other actions.
            (Some(schema), Some(base)) => base.clone().add_entities(request_entities, Some(schema)),
            // An action the schema lacks: `Request::new` refuses it below.
            (schema, _) => Entities::from_entities(request_entities, schema.as_ref()),
        };
        let entities = match entities {
            Ok(e) => e,
            Err(e) => return Verdict::Error(format!("entities: {}", full_message(&e, Some(&e)))),
        };
        context.push((
            "scopes".into(),
            RestrictedExpression::new_set(
                crate::auth::scopes_of(claims)
                    .into_iter()
                    .map(|s| RestrictedExpression::new_string(s.to_string())),
            ),
        ));
        let context = match Context::from_pairs(context) {
            Ok(c) => c,
            Err(e) => return Verdict::Error(format!("context: {}", full_message(&e, Some(&e)))),
        };
        let action_id = action;
        let action =
            EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(action));
        let request = match cedar_policy::Request::new(
            principal,
            action,
            resource.uid.clone(),
            context,
            self.schema.as_ref(),
        ) {
            Ok(r) => r,
            Err(e) => return Verdict::Error(format!("request: {}", full_message(&e, Some(&e)))),
        };
        let policies = self.slices.get(action_id).unwrap_or(&self.unnamed);
        let response = self.engine.is_authorized(&request, policies, &entities);
        let diagnostics = response.diagnostics();
        if let Some(e) = diagnostics.errors().next() {
            return Verdict::Error(full_message(e, Some(e)));
        }
        let policies: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        match response.decision() {
            CedarDecision::Allow => Verdict::Allow { policies },
            CedarDecision::Deny => Verdict::Deny { policies },
        }
    }
}

/// Splits `policies` by the actions they can apply to (see [`Authorizer::slices`]): for each
/// action of `action_type` named in a policy's scope or declared in the schema, the policies
/// whose action constraint is unconstrained, names it, or names one of its action groups
/// (from the schema); plus the slice of every other action.
///
/// `groups` are the schema's action entities (their ancestors are the action groups).
fn slice(
    policies: &PolicySet,
    schema: Option<&Schema>,
    groups: Option<&Entities>,
    action_type: &EntityTypeName,
) -> Result<(HashMap<String, PolicySet>, PolicySet), String> {
    use cedar_policy::ActionConstraint;
    // Every action a decision may name that some policy or the schema knows.
    let mut actions: HashSet<EntityUid> = HashSet::new();
    for p in policies.policies() {
        match p.action_constraint() {
            ActionConstraint::Eq(a) => {
                actions.insert(a);
            }
            ActionConstraint::In(list) => actions.extend(list),
            ActionConstraint::Any => {}
        }
    }
    if let Some(s) = schema {
        actions.extend(s.actions().cloned());
    }
    let applies = |p: &cedar_policy::Policy, a: &EntityUid| -> bool {
        match p.action_constraint() {
            ActionConstraint::Eq(x) => &x == a,
            ActionConstraint::In(list) => {
                list.contains(a)
                    || groups
                        .and_then(|g| g.ancestors(a))
                        .is_some_and(|mut up| up.any(|x| list.contains(x)))
            }
            ActionConstraint::Any => true,
        }
    };
    let mut slices = HashMap::new();
    for a in actions.iter().filter(|a| a.type_name() == action_type) {
        let mut set = PolicySet::new();
        for p in policies.policies().filter(|p| applies(p, a)) {
            set.add(p.clone()).map_err(|e| e.to_string())?;
        }
        slices.insert(a.id().unescaped().to_string(), set);
    }
    let mut unnamed = PolicySet::new();
    for p in policies
        .policies()
        .filter(|p| matches!(p.action_constraint(), ActionConstraint::Any))
    {
        unnamed.add(p.clone()).map_err(|e| e.to_string())?;
    }
    Ok((slices, unnamed))
}

/// Recent decisions, per thread (no lock): a client repeating a request (the same token,
/// operation, resource and context values) gets the decision Cedar made the first time, as
/// API Gateway caches an authorizer's answer per token. A decision is a pure function of
/// the key (the policies are those of one load, named by its id; no entity comes from
/// outside the request), so the cache is never stale; errors are not cached. Direct-mapped,
/// 512 slots per thread; the whole key is compared.
mod decisions {
    use std::cell::RefCell;
    use std::hash::{Hash, Hasher};

    use super::Verdict;

    const SLOTS: usize = 512;

    type Slot = Option<(u64, String, Verdict)>;

    thread_local! {
        static CACHE: RefCell<Vec<Slot>> = RefCell::new(vec![None; SLOTS]);
    }

    fn slot(authz: u64, key: &str) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        authz.hash(&mut h);
        key.hash(&mut h);
        (h.finish() as usize) % SLOTS
    }

    pub(super) fn lookup(authz: u64, key: &str) -> Option<Verdict> {
        CACHE.with(|c| {
            let c = c.borrow();
            match c.get(slot(authz, key))? {
                Some((a, k, v)) if *a == authz && k == key => Some(v.clone()),
                _ => None,
            }
        })
    }

    pub(super) fn insert(authz: u64, key: String, verdict: &Verdict) {
        let i = slot(authz, &key);
        CACHE.with(|c| {
            if let Some(s) = c.borrow_mut().get_mut(i) {
                *s = Some((authz, key, verdict.clone()));
            }
        });
    }
}

/// A claim as text (strings as they are, numbers and booleans as written).
fn claim_text<'c>(claims: &'c Map<String, Value>, name: &str) -> Option<Cow<'c, str>> {
    match claims.get(name)? {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Owned(b.to_string())),
        _ => None,
    }
}

/// A claim holding a list: a JSON array of strings or a space-separated string.
fn claim_list(claims: &Map<String, Value>, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// What Cedar decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Permitted, by these policies.
    Allow {
        /// Determining policy ids.
        policies: Vec<String>,
    },
    /// Refused: by these `forbid` policies, or (empty) because no `permit` applied.
    Deny {
        /// Determining policy ids.
        policies: Vec<String>,
    },
    /// The request could not be decided (schema mismatch, evaluation error): refused.
    Error(String),
}

/// A resource entity of one request.
#[derive(Debug, Clone)]
pub struct ResourceInstance {
    uid: EntityUid,
    attrs: HashMap<String, RestrictedExpression>,
    /// Its uid and attributes as text (decision cache key).
    key: String,
}

/// How a resource is made from path parameters.
#[derive(Debug)]
pub struct ResourceSpec {
    ty: EntityTypeName,
    /// `None`: the request path.
    id: Option<Template>,
    attrs: Vec<(String, AttrSpec)>,
}

#[derive(Debug)]
enum AttrSpec {
    Text(Template),
    Entity(EntityTypeName, Template),
}

impl ResourceSpec {
    /// Compiles a resource section; `params` are the path parameters available (`None`:
    /// any); errors are messages for the config.
    pub fn compile(
        cfg: &crate::config::file::ResourceConfig,
        params: Option<&[&str]>,
        authz: &Authorizer,
    ) -> Result<ResourceSpec, String> {
        let ty = EntityTypeName::from_str(cfg.entity_type.trim())
            .map_err(|e| format!("resource type {:?}: {e}", cfg.entity_type))?;
        if !authz.type_declared(&ty.to_string()) {
            return Err(format!(
                "resource type {:?} is not an entity type of the Cedar schema",
                cfg.entity_type
            ));
        }
        let check = |t: &Template| -> Result<(), String> {
            if let Some(ps) = params {
                if let Some(v) = t.vars().find(|v| !ps.contains(v)) {
                    return Err(format!(
                        "`{{{v}}}` is not a parameter of the path template (it has: {})",
                        ps.join(", ")
                    ));
                }
            }
            Ok(())
        };
        let id = cfg.id.as_deref().map(Template::parse).transpose()?;
        if let Some(t) = &id {
            check(t)?;
        }
        let mut attrs = Vec::new();
        for (name, a) in &cfg.attributes {
            let spec = match a {
                crate::config::file::ResourceAttributeConfig::Text(t) => {
                    AttrSpec::Text(Template::parse(t)?)
                }
                crate::config::file::ResourceAttributeConfig::Entity { entity_type, id } => {
                    let ty = EntityTypeName::from_str(entity_type.trim())
                        .map_err(|e| format!("attribute {name:?}: type {entity_type:?}: {e}"))?;
                    AttrSpec::Entity(ty, Template::parse(id)?)
                }
            };
            match &spec {
                AttrSpec::Text(t) | AttrSpec::Entity(_, t) => check(t)?,
            }
            attrs.push((name.clone(), spec));
        }
        Ok(ResourceSpec { ty, id, attrs })
    }

    /// A fixed resource (`App::Route::"name"`).
    pub fn fixed(ty: &str, id: &str) -> Result<ResourceSpec, String> {
        Ok(ResourceSpec {
            ty: EntityTypeName::from_str(ty).map_err(|e| format!("type {ty:?}: {e}"))?,
            id: Some(Template {
                pieces: vec![Piece::Text(id.to_string())],
            }),
            attrs: Vec::new(),
        })
    }

    /// The resource of a request with these path parameters.
    pub fn instance(
        &self,
        path: &str,
        params: &[(&str, Cow<'_, str>)],
    ) -> Option<ResourceInstance> {
        let get = |n: &str| {
            params
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| Cow::Borrowed(v.as_ref()))
        };
        let id = match &self.id {
            Some(t) => t.render(get)?,
            None => path.to_string(),
        };
        let uid = EntityUid::from_type_name_and_id(self.ty.clone(), EntityId::new(id));
        let mut key = uid.to_string();
        let mut attrs = HashMap::with_capacity(self.attrs.len());
        for (name, a) in &self.attrs {
            let v = match a {
                AttrSpec::Text(t) => {
                    let text = t.render(get)?;
                    let _ = write!(key, "\u{1}{}:{text}", text.len());
                    RestrictedExpression::new_string(text)
                }
                AttrSpec::Entity(ty, t) => {
                    let e =
                        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(t.render(get)?));
                    let _ = write!(key, "\u{2}{e}");
                    RestrictedExpression::new_entity_uid(e)
                }
            };
            attrs.insert(name.clone(), v);
        }
        Some(ResourceInstance { uid, attrs, key })
    }
}

/// An operation of `policy.authorize`.
#[derive(Debug)]
pub struct AuthzOperation {
    template: PathTemplate,
    /// The template as written (`/users/{user}/activities`).
    path: String,
    methods: Vec<Method>,
    /// A fixed action id (`action:` or the OpenAPI `operationId`); else `METHOD path`.
    action: Option<String>,
    resource: Option<ResourceSpec>,
}

impl AuthzOperation {
    /// Compiles one operation.
    pub fn new(
        path: &str,
        methods: Vec<Method>,
        action: Option<String>,
        resource: Option<&crate::config::file::ResourceConfig>,
        authz: &Authorizer,
    ) -> Result<AuthzOperation, String> {
        let template = PathTemplate::parse(path)?;
        let resource = resource
            .map(|r| ResourceSpec::compile(r, Some(&template.params()), authz))
            .transpose()?;
        let op = AuthzOperation {
            template,
            path: path.to_string(),
            methods,
            action,
            resource,
        };
        for id in op.action_ids() {
            if !authz.action_declared(&id) {
                return Err(format!(
                    "action {id:?} is not declared in the Cedar schema (declare it with \
                     `action \"{id}\" appliesTo {{ … }};`)"
                ));
            }
        }
        Ok(op)
    }

    /// The action ids it can produce (for checking against the schema); an any-method
    /// operation without a fixed action produces the common methods' ids.
    fn action_ids(&self) -> Vec<String> {
        match &self.action {
            Some(a) => vec![a.clone()],
            None if self.methods.is_empty() => Vec::new(),
            None => self
                .methods
                .iter()
                .map(|m| format!("{m} {}", self.path))
                .collect(),
        }
    }

    /// Whether it names its own resource.
    pub fn has_resource(&self) -> bool {
        self.resource.is_some()
    }

    fn action(&self, method: &str) -> Cow<'_, str> {
        match &self.action {
            Some(a) => Cow::Borrowed(a),
            None => Cow::Owned(format!("{method} {}", self.path)),
        }
    }
}

/// A route's Cedar authorization, compiled.
#[derive(Debug)]
pub struct RouteAuthz {
    authorizer: Arc<Authorizer>,
    /// Most specific template first.
    ops: Vec<AuthzOperation>,
    default_resource: ResourceSpec,
    query: Vec<String>,
    body: Vec<(String, String)>,
}

impl RouteAuthz {
    /// Assembles a route's authorization.
    pub fn new(
        authorizer: Arc<Authorizer>,
        mut ops: Vec<AuthzOperation>,
        default_resource: ResourceSpec,
        query: Vec<String>,
        body: Vec<(String, String)>,
    ) -> RouteAuthz {
        ops.sort_by_key(|o| std::cmp::Reverse(o.template.rank()));
        RouteAuthz {
            authorizer,
            ops,
            default_resource,
            query,
            body,
        }
    }

    /// The policies and principal mapping.
    pub fn authorizer(&self) -> &Authorizer {
        &self.authorizer
    }

    /// Whether the context takes body values.
    pub fn needs_body(&self) -> bool {
        !self.body.is_empty()
    }

    /// The context members from the request (query and body values), and their text for
    /// the decision cache key (each value length-prefixed, absent ones marked); an error when
    /// a body value cannot be made a Cedar value.
    pub fn request_context(
        &self,
        req: &Request<'_>,
    ) -> Result<(Vec<(String, RestrictedExpression)>, String), String> {
        let mut ctx = Vec::with_capacity(3);
        let mut key = String::new();
        let mut part = |v: Option<&str>| match v {
            Some(v) => {
                let _ = write!(key, "{}:{v}", v.len());
            }
            None => key.push('-'),
        };
        if !self.query.is_empty() {
            let mut q = Vec::with_capacity(self.query.len());
            for n in &self.query {
                let v = req.query_arg(n);
                part(v);
                if let Some(v) = v {
                    q.push((n.clone(), RestrictedExpression::new_string(v.to_string())));
                }
            }
            let r = RestrictedExpression::new_record(q).map_err(|e| e.to_string())?;
            ctx.push(("query".into(), r));
        }
        if !self.body.is_empty() {
            if let Ok(doc) = req.json_document() {
                let mut b = Vec::with_capacity(self.body.len());
                for (n, ptr) in &self.body {
                    let v = doc.pointer(ptr);
                    part(v.map(Value::to_string).as_deref());
                    if let Some(c) = v.map(to_cedar).transpose()?.flatten() {
                        b.push((n.clone(), c));
                    }
                }
                let r = RestrictedExpression::new_record(b).map_err(|e| e.to_string())?;
                ctx.push(("body".into(), r));
            } else {
                part(None);
            }
        }
        Ok((ctx, key))
    }

    /// Decides an HTTP request: its operation, action and resource.
    pub fn decide_http(&self, req: &Request<'_>, claims: &Map<String, Value>) -> Verdict {
        let path = req.raw_path;
        let method = req.method;
        for op in &self.ops {
            if !op.methods.is_empty() && !op.methods.iter().any(|m| m.as_str() == method) {
                continue;
            }
            let Some(params) = op.template.matches(path) else {
                continue;
            };
            let spec = op.resource.as_ref().unwrap_or(&self.default_resource);
            let Some(resource) = spec.instance(path, &params) else {
                return Verdict::Error("the resource id needs a missing path parameter".into());
            };
            let (context, key) = match self.request_context(req) {
                Ok(c) => c,
                Err(e) => return Verdict::Error(format!("context: {e}")),
            };
            return self.authorizer.decide(
                claims,
                &op.action(method),
                &resource,
                context,
                Some(&key),
            );
        }
        Verdict::Error(format!(
            "no operation of policy.authorize matches {method} {path}"
        ))
    }

    /// Decides an action on the route's default resource (MCP messages); `input` (a tool's
    /// arguments) goes to `context.input`.
    pub fn decide_action(
        &self,
        claims: &Map<String, Value>,
        action: &str,
        input: Option<&Value>,
        req: &Request<'_>,
    ) -> Verdict {
        let Some(resource) = self.default_resource.instance(req.raw_path, &[]) else {
            return Verdict::Error("the resource id needs a path parameter".into());
        };
        let (mut context, mut key) = match self.request_context(req) {
            Ok(c) => c,
            Err(e) => return Verdict::Error(format!("context: {e}")),
        };
        if let Some(input) = input {
            // `null` arguments are no arguments: an empty record.
            let record = match to_cedar(input) {
                Ok(Some(r)) => Ok(r),
                Ok(None) => RestrictedExpression::new_record([]).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let record = match record {
                Ok(r) => r,
                Err(e) => return Verdict::Error(format!("context.input: {e}")),
            };
            context.push(("input".into(), record));
            let text = input.to_string();
            let _ = write!(key, "\u{1}{}:{text}", text.len());
        }
        self.authorizer
            .decide(claims, action, &resource, context, Some(&key))
    }
}

/// The refusal of a request Cedar did not permit (403), with the policies that decided it
/// (or the error) for the logs, never for the client.
pub fn refusal(verdict: &Verdict) -> Option<Block> {
    let (reason, fields) = match verdict {
        Verdict::Allow { .. } => return None,
        Verdict::Deny { policies } => {
            let mut f = Map::new();
            f.insert(
                "policies".into(),
                Value::Array(policies.iter().cloned().map(Value::String).collect()),
            );
            ("forbidden", f)
        }
        Verdict::Error(e) => {
            let mut f = Map::new();
            f.insert("authorization_error".into(), Value::String(e.clone()));
            ("authorization_error", f)
        }
    };
    let mut b = Block::new(403, reason);
    b.details = Some(Arc::new(BlockDetails {
        fields,
        expose: false,
        body: None,
    }));
    Some(b)
}

/// The pipeline stage of `policy.authorize` (HTTP routes; MCP routes decide per message).
#[derive(Debug)]
pub struct AuthorizeStage {
    authz: Arc<RouteAuthz>,
}

impl AuthorizeStage {
    /// The stage.
    pub fn new(authz: Arc<RouteAuthz>) -> AuthorizeStage {
        AuthorizeStage { authz }
    }
}

impl Stage for AuthorizeStage {
    fn kind(&self) -> StageKind {
        StageKind::Authorize
    }

    fn needs(&self) -> Needs {
        Needs {
            body: self.authz.needs_body(),
            geo: false,
        }
    }

    fn evaluate<'s>(&'s self, req: &Request<'_>, _notes: &mut Notes) -> Eval<'s> {
        let Some(claims) = req.claims() else {
            // The auth stage runs first on every route with `authorize`: no claims is a bug
            // or a token-less path; either way, no.
            return Eval::Done(Decision::Block(
                refusal(&Verdict::Error("no verified token".into()))
                    .unwrap_or_else(|| Block::new(403, "authorization_error")),
            ));
        };
        let verdict = self.authz.decide_http(req, claims);
        Eval::Done(match refusal(&verdict) {
            Some(b) => Decision::Block(b),
            None => Decision::Continue,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    #[test]
    fn templates_render_and_report_missing_values() {
        let t = Template::parse("{iss}|{sub}").unwrap();
        let v = |n: &str| match n {
            "iss" => Some(Cow::Borrowed("https://id")),
            "sub" => Some(Cow::Borrowed("alice")),
            _ => None,
        };
        assert_eq!(t.render(v).as_deref(), Some("https://id|alice"));
        let t = Template::parse("u-{nope}").unwrap();
        assert_eq!(t.render(v), None);
        assert!(Template::parse("{open").is_err());
        assert!(Template::parse("{}").is_err());
    }

    #[test]
    fn request_data_cannot_forge_an_entity_reference() {
        let v: Value = serde_json::json!({"__entity": {"type": "App::User", "id": "admin"}});
        let policies: PolicySet = r#"permit (principal, action, resource)
            when { context.body has __entity };
            forbid (principal, action, resource)
            when { context.body == App::User::"admin" };"#
            .parse()
            .unwrap();
        let uid = |s: &str| EntityUid::from_str(s).unwrap();
        let decide = |ctx: Context| {
            let req = cedar_policy::Request::new(
                uid(r#"App::User::"alice""#),
                uid(r#"App::Action::"x""#),
                uid(r#"App::R::"r""#),
                ctx,
                None,
            )
            .unwrap();
            let r =
                cedar_policy::Authorizer::new().is_authorized(&req, &policies, &Entities::empty());
            assert_eq!(r.diagnostics().errors().count(), 0);
            r.decision()
        };
        // Ours: a record with a member named `__entity`.
        let ours =
            Context::from_pairs([("body".to_string(), to_cedar(&v).unwrap().unwrap())]).unwrap();
        assert_eq!(decide(ours), CedarDecision::Allow);
        // Too deep to convert: an error, not a value with members missing.
        let mut deep = serde_json::json!("x");
        for _ in 0..40 {
            deep = serde_json::json!({ "a": deep });
        }
        assert!(to_cedar(&deep).is_err());
        assert!(to_cedar(&serde_json::json!({"a": [1, null], "b": null}))
            .unwrap()
            .is_some());
        // Cedar's JSON reading makes it the entity `App::User::"admin"`.
        let theirs = Context::from_json_value(serde_json::json!({ "body": v }), None).unwrap();
        assert_eq!(decide(theirs), CedarDecision::Deny);
    }

    /// An authorizer over `policies` and an optional `schema`, written to `dir` (again on each
    /// call: a second call is a reload), with principal attributes from the claims `attrs`.
    fn authorizer(
        dir: &tempfile::TempDir,
        schema: Option<&str>,
        policies: &str,
        attrs: &[&str],
    ) -> Authorizer {
        let policy_file = dir.path().join("p.cedar");
        std::fs::write(&policy_file, policies).unwrap();
        let schema_file = schema.map(|text| {
            let f = dir.path().join("s.cedarschema");
            std::fs::write(&f, text).unwrap();
            f
        });
        let attrs: BTreeMap<String, String> = attrs
            .iter()
            .map(|a| (a.to_string(), a.to_string()))
            .collect();
        Authorizer::load(&AuthorizerSpec {
            policy_files: vec![policy_file],
            schema_file,
            principal_type: "App::User",
            principal_id: None,
            groups: None,
            attributes: &attrs,
            action_type: None,
        })
        .unwrap()
    }

    fn claims(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    fn doc() -> ResourceInstance {
        ResourceSpec::fixed("App::Doc", "d")
            .unwrap()
            .instance("/", &[])
            .unwrap()
    }

    #[test]
    fn policy_slices_keep_policies_of_action_groups() {
        let dir = tempfile::tempdir().unwrap();
        let z = authorizer(
            &dir,
            Some(
                r#"namespace App {
                entity User; entity Doc;
                action "read";
                action "view" in ["read"] appliesTo { principal: User, resource: Doc, context: { scopes: Set<String> } };
                action "edit" appliesTo { principal: User, resource: Doc, context: { scopes: Set<String> } };
            }"#,
            ),
            r#"@id("all") permit (principal, action, resource);
               @id("no-reading") forbid (principal, action in App::Action::"read", resource);"#,
            &[],
        );
        let claims = claims(r#"{"sub":"u"}"#);
        let doc = doc();
        // `view` is in the group `read`: the forbid applies although it names only the group.
        assert_eq!(
            z.decide(&claims, "view", &doc, Vec::new(), None),
            Verdict::Deny {
                policies: vec!["no-reading".into()]
            }
        );
        assert_eq!(
            z.decide(&claims, "edit", &doc, Vec::new(), None),
            Verdict::Allow {
                policies: vec!["all".into()]
            }
        );
        // An action the schema does not declare: refused as an error, not decided.
        assert!(matches!(
            z.decide(&claims, "delete", &doc, Vec::new(), None),
            Verdict::Error(_)
        ));
    }

    #[test]
    fn cached_decisions_follow_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let z = authorizer(
            &dir,
            None,
            r#"@id("mine") permit (principal, action, resource)
                 when { context has n && context.n == 1 && principal.team == "red" };"#,
            &["team"],
        );
        let doc = doc();
        let red = claims(r#"{"sub":"u","team":"red"}"#);
        let blue = claims(r#"{"sub":"u","team":"blue"}"#);
        let ctx = |n: i64| vec![("n".to_string(), RestrictedExpression::new_long(n))];
        let allow = Verdict::Allow {
            policies: vec!["mine".into()],
        };
        let deny = Verdict::Deny { policies: vec![] };
        for _ in 0..2 {
            assert_eq!(z.decide(&red, "a", &doc, ctx(1), Some("n=1")), allow);
            // Another context value, another principal attribute: other keys.
            assert_eq!(z.decide(&red, "a", &doc, ctx(2), Some("n=2")), deny);
            assert_eq!(z.decide(&blue, "a", &doc, ctx(1), Some("n=1")), deny);
        }
        // A reload's authorizer does not see the old one's decisions.
        let reloaded = authorizer(
            &dir,
            None,
            "forbid (principal, action, resource);",
            &["team"],
        );
        assert!(matches!(
            reloaded.decide(&red, "a", &doc, ctx(1), Some("n=1")),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn principals_are_checked_against_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let z = authorizer(
            &dir,
            Some(
                r#"namespace App {
                entity User { level: Long }; entity Doc;
                action "edit" appliesTo { principal: User, resource: Doc, context: { scopes: Set<String> } };
            }"#,
            ),
            r#"@id("all") permit (principal, action, resource);
               @id("not-banned") forbid (principal, action, resource) when { principal.level == 0 };"#,
            &["level"],
        );
        let doc = doc();
        let edit = |c: &str| z.decide(&claims(c), "edit", &doc, Vec::new(), None);
        assert!(matches!(
            edit(r#"{"sub":"u","level":3}"#),
            Verdict::Allow { .. }
        ));
        assert!(matches!(
            edit(r#"{"sub":"u","level":0}"#),
            Verdict::Deny { .. }
        ));
        // A claim of the wrong type would make the forbid's condition silently false: the
        // schema check refuses the request instead.
        assert!(matches!(
            edit(r#"{"sub":"u","level":"0"}"#),
            Verdict::Error(_)
        ));
    }
}
