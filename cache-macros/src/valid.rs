//! Every check that relates the arguments, the key template and the function
//! to each other. All errors are collected; a `Plan` comes out only when there
//! are none, with every placeholder resolved to what it names, so that
//! `expand` looks nothing up. With errors, a [`Stub`] comes out instead: the
//! key function's signature, for a stub that keeps writers compiling.

use proc_macro2::Span;
use syn::{Expr, Generics, Ident, LitStr, Path, Type, Visibility};

use crate::args::{Args, SingleFlight, Target, WriteArgs, WriteKind};
use crate::ast::{AnnotatedFn, Asyncness, Param, Shape};
use crate::ctxt::{Errors, did_you_mean, hint};
use crate::template::{self, Segment, Template};
use crate::types;

/// A validated `#[redis_cached]`: everything `expand` needs, nothing it must check.
pub struct Plan<'a> {
    pub func: AnnotatedFn<'a>,
    /// The key function's visibility.
    pub key_vis: Visibility,
    pub key: Key<'a>,
    pub key_fn: KeyFn<'a>,
    pub ttl_millis: u64,
    pub jitter: f64,
    pub single_flight: SingleFlight,
    pub stale_millis: Option<u64>,
    pub early_refresh: Option<f64>,
    /// `cache_none` / `none_ttl`: how long an answer of `None` is cached.
    pub none_ttl_millis: Option<u64>,
    /// `batch`: the collection parameter whose elements are the ids.
    pub batch: Option<Batch<'a>>,
    /// `local = "5s"`: how long a copy stays in process memory.
    pub local_millis: Option<u64>,
    /// `tags = [...]`, resolved like the key.
    pub tags: Vec<Key<'a>>,
    /// `tags_from = path`.
    pub tags_from: Option<&'a Path>,
    /// `fail_safe = "1h"`, in milliseconds.
    pub fail_safe_millis: Option<u64>,
    /// `soft_timeout = "150ms"`, in milliseconds.
    pub soft_timeout_millis: Option<u64>,
    /// With `soft_timeout`: the body can outlive the call (no receiver,
    /// owned parameters and result), so a slow one finishes in the
    /// background.
    pub detached: bool,
    /// `ttl_from = path`.
    pub ttl_from: Option<&'a Path>,
    /// `unless = path`.
    pub unless: Option<&'a Path>,
    pub version: Option<u32>,
    pub cache: Option<&'a Expr>,
    pub krate: Path,
    /// The function as statistics name it, after the module path.
    pub stats_name: String,
}

/// What is left of a `#[redis_cached]` with errors: enough for a stub
/// `<fn>_cache_key`, so that a writer naming the function gets no
/// follow-on error.
pub struct Stub<'a> {
    pub func: AnnotatedFn<'a>,
    pub key_vis: Visibility,
    pub key_fn: KeyFn<'a>,
    pub krate: Path,
}

/// The batch parameter of a `batch` function.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    /// As declared (`ids: &[u64]`).
    pub param: Param<'a>,
    /// One id's type (`u64`).
    pub element: &'a Type,
}

/// A key template with every placeholder resolved.
pub struct Key<'a> {
    /// The template as written, for spans and docs.
    pub literal: &'a LitStr,
    pub parts: Vec<Part<'a>>,
    /// A guess at the rendered length, to allocate once.
    pub capacity: usize,
}

/// One piece of a resolved key.
pub enum Part<'a> {
    Literal(String),
    /// `<self.field…>`.
    SelfField(Vec<String>),
    /// `<param>` or `<param.field…>`.
    Param(Param<'a>, Vec<String>),
}

/// The signature of the generated `<fn>_cache_key`.
pub struct KeyFn<'a> {
    /// The parameters in the key, in declaration order.
    pub params: Vec<Param<'a>>,
    /// Whether it takes `&self` (the key reads `<self...>`).
    pub uses_self: bool,
    /// The cached function's generics that the key's parameters need.
    pub generics: Generics,
    /// Whether it can name the cached value type in `CacheKey<V>` (else
    /// `CacheKey<Untyped>`).
    pub value_nameable: bool,
    /// For a `batch` function: the key of one id, whose value type is one
    /// map value.
    pub batch: bool,
}

/// Where the annotated fn is being expanded.
#[derive(Default)]
pub struct Context {
    /// By `#[cached_impl]`, which moves the key function to an inherent impl
    /// of the type, with this visibility; else `None` (a free fn, or a method
    /// whose key function stays beside it).
    pub key_fn_moved: Option<Visibility>,
    /// By `#[cached_impl]`: the impl's type as statistics name it (`Repo`,
    /// `<Repo as UserRepo>`), between the module path and the method.
    pub owner: Option<String>,
}

pub fn validate<'a>(
    args: &'a Args,
    func: AnnotatedFn<'a>,
    context: Context,
    errors: &mut Errors,
) -> Result<Plan<'a>, Box<Stub<'a>>> {
    let sig = &func.item.sig;
    let stats_name = stats_name(context.owner.as_deref(), func.name());
    match func.asyncness {
        Asyncness::Native => {}
        Asyncness::AsyncTrait { .. } if context.key_fn_moved.is_some() => {}
        Asyncness::AsyncTrait { .. } => errors.at(
            Span::call_site(),
            format!(
                "`#[redis_cached]` on a method of a trait impl needs `#[cache_runtime::cached_impl]` on the impl block: \
                 the generated `{}_cache_key` cannot be a member of the trait, so `#[cached_impl]` puts it in an inherent impl\n\
                 help: add `#[cached_impl]` to the impl block, next to `#[async_trait]`",
                sig.ident
            ),
        ),
        Asyncness::Not => errors.spanned(
            sig.fn_token,
            format!(
                "`#[redis_cached]` needs an `async fn`: reaching the cache is network I/O\n\
                 help: declare it as `async fn {}(...)`",
                sig.ident
            ),
        ),
    }
    let key_vis = context
        .key_fn_moved
        .unwrap_or_else(|| func.item.vis.clone());
    if args.key.is_none() && !args.given.iter().any(|a| a == "key") {
        errors.at(
            Span::call_site(),
            "missing `key` argument\nhelp: add a key template that names the parameters, e.g. `key = \"user:<id>\"`",
        );
    }
    if args.ttl.is_none() && !args.given.iter().any(|a| a == "ttl") {
        errors.at(
            Span::call_site(),
            "missing `ttl` argument: every cache entry needs an expiry, or a missed invalidation stays stale forever\n\
             help: add `ttl = 60` (seconds) or `ttl = \"5m\"`",
        );
    }

    for pattern in &func.unnamed {
        errors.spanned(
            pattern,
            "a parameter of a cached function must be a plain name, so that the key template can refer to it\n\
             help: bind it to a name and destructure it inside the body",
        );
    }

    let template = args
        .key
        .as_ref()
        .and_then(|key| parse_template(key, errors));
    let mut placeholders = Placeholders::default();
    if let (Some(t), Some(key)) = (&template, &args.key) {
        placeholders = resolve_placeholders(&func, t, key, errors);
    }
    let Placeholders {
        in_key,
        suggested,
        uses_self,
    } = placeholders;

    let tags = check_tags(&func, args, template.as_ref(), &in_key, uses_self, errors);
    check_skip(&func, &args.skip, &in_key, errors);
    check_negative(&func, args, errors);
    check_fail_safe(&func, args, errors);
    let batch = args
        .batch
        .and_then(|span| check_batch(&func, args, template.as_ref(), &in_key, span, errors));

    if template.is_some() {
        for param in &func.params {
            let name = param.ident.to_string();
            if !in_key.contains(&name.as_str())
                && !args.skip.iter().any(|s| *s == name)
                && !suggested.contains(&name)
            {
                errors.spanned(
                    param.arg,
                    format!(
                        "parameter `{name}` is not in the cache key, so calls that differ only in `{name}` would share one entry\n\
                         help: add `<{name}>` to the key template, or `skip({name})` if it cannot change the result"
                    ),
                );
            }
        }
    }

    // The key function's parameters: those in the key. For a stub, also
    // those a misspelt placeholder meant ("did you mean"), and without a
    // template, every parameter not skipped.
    let key_params: Vec<Param<'a>> = func
        .params
        .iter()
        .filter(|p| match &template {
            Some(_) => {
                in_key.iter().any(|k| p.ident == k) || suggested.iter().any(|s| p.ident == s)
            }
            None => !args.skip.iter().any(|s| s == p.ident),
        })
        // The key function of a batch takes one id.
        .map(|p| match &batch {
            Some(b) if b.param.ident == p.ident => Param {
                ty: b.element,
                ..*p
            },
            _ => *p,
        })
        .collect();
    let mut key_fn = key_fn(&func, key_params, uses_self && func.receiver.is_some());
    key_fn.batch = batch.is_some();
    let krate = args
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::cache_runtime));
    let (Some(template), Some(literal), Some(ttl), false) = (
        template,
        args.key.as_ref(),
        args.ttl.as_ref(),
        errors.has_errors(),
    ) else {
        return Err(Box::new(Stub {
            func,
            key_vis,
            key_fn,
            krate,
        }));
    };
    let mut key = resolve(&func, &template, literal);
    let mut tags = tags;
    if let Some(b) = &batch {
        // The key function of a batch renders one id.
        for part in key
            .parts
            .iter_mut()
            .chain(tags.iter_mut().flat_map(|t| &mut t.parts))
        {
            if let Part::Param(param, _) = part
                && param.ident == b.param.ident
            {
                param.ty = b.element;
            }
        }
    }
    let detached = args.soft_timeout.is_some() && {
        let unit: Type = syn::parse_quote!(());
        let mut types: Vec<&Type> = func.params.iter().map(|p| p.ty).collect();
        types.push(func.output.ty.unwrap_or(&unit));
        func.receiver.is_none() && types::owned(&types, &func.item.sig.generics)
    };
    Ok(Plan {
        func,
        key_vis,
        key,
        key_fn,
        ttl_millis: ttl.millis,
        jitter: args.jitter.unwrap_or(0.0),
        single_flight: args.single_flight,
        stale_millis: args.stale_millis,
        early_refresh: args.early_refresh,
        none_ttl_millis: args
            .none_ttl
            .map(|(millis, _)| millis)
            .or(args.cache_none.map(|_| ttl.millis)),
        batch,
        local_millis: args.local_millis,
        tags,
        tags_from: args.tags_from.as_ref(),
        fail_safe_millis: args.fail_safe.map(|(millis, _)| millis),
        soft_timeout_millis: args.soft_timeout.map(|(millis, _)| millis),
        detached,
        ttl_from: args.ttl_from.as_ref(),
        unless: args.unless.as_ref(),
        version: args.version,
        cache: args.cache.as_ref(),
        krate,
        stats_name,
    })
}

/// `tags = [...]`: each a template over the parameters the key names (two
/// calls that share an entry must share its tags). A batch's tags are
/// rendered per id, as its keys are.
fn check_tags<'a>(
    func: &AnnotatedFn<'a>,
    args: &'a Args,
    key: Option<&Template>,
    in_key: &[&str],
    key_uses_self: bool,
    errors: &mut Errors,
) -> Vec<Key<'a>> {
    if args.tags_span.is_none() {
        return Vec::new();
    }
    let mut tags = Vec::new();
    for literal in &args.tags {
        let Some(template) = parse_template(literal, errors) else {
            continue;
        };
        let found = resolve_placeholders(func, &template, literal, errors);
        for name in &found.in_key {
            if !in_key.contains(name) {
                errors.spanned(
                    literal,
                    format!(
                        "tag placeholder `<{name}>` names `{name}`, which is not in the key: calls that share one entry would carry different tags\n\
                         help: a tag can only name parameters the key names; add `<{name}>` to the key, or tag by what the key holds"
                    ),
                );
            }
        }
        if found.uses_self && !key_uses_self {
            errors.spanned(
                literal,
                "this tag reads `self`, but the key does not: calls that share one entry would carry different tags\n\
                 help: a tag can only name what the key names",
            );
        }
        // Named in the key, but a field the key does not name: `<user.id>`
        // in the key does not decide `<user.org_id>`.
        if let Some(key) = key {
            for placeholder in template.placeholders() {
                let named = key.placeholders().any(|k| {
                    k.root == placeholder.root && placeholder.fields.starts_with(&k.fields)
                });
                let root_named = (placeholder.root == "self" && key_uses_self)
                    || in_key.contains(&placeholder.root.as_str());
                if !named && root_named {
                    errors.spanned(
                        literal,
                        format!(
                            "tag placeholder `{placeholder}` is not decided by the key, which names other parts of `{}`: calls that share one entry could carry different tags\n\
                             help: a tag may name what the key names, or a field of it (`<user>` in the key allows `<user.org_id>`)",
                            placeholder.root
                        ),
                    );
                }
            }
        }
        tags.push(resolve(func, &template, literal));
    }
    tags
}

/// `name`, or `Owner::name` for a method of an impl under `#[cached_impl]`.
fn stats_name(owner: Option<&str>, name: &syn::Ident) -> String {
    match owner {
        Some(owner) => format!("{owner}::{name}"),
        None => name.to_string(),
    }
}

/// The key function's generics and value type, from its parameters.
fn key_fn<'a>(func: &AnnotatedFn<'a>, params: Vec<Param<'a>>, uses_self: bool) -> KeyFn<'a> {
    let declared = &func.item.sig.generics;
    let types: Vec<&Type> = params.iter().map(|p| p.ty).collect();
    let generics = types::used_by(declared, &types);
    let unit: Type = syn::parse_quote!(());
    let value_nameable = types::nameable(func.output.ty.unwrap_or(&unit), declared, &generics);
    KeyFn {
        params,
        uses_self,
        generics,
        value_nameable,
        batch: false,
    }
}

/// The template's placeholders, resolved to what they name; placeholders
/// that name nothing have been reported.
fn resolve<'a>(func: &AnnotatedFn<'a>, template: &Template, literal: &'a LitStr) -> Key<'a> {
    let parts: Vec<Part<'a>> = template
        .segments
        .iter()
        .filter_map(|segment| match segment {
            Segment::Literal(text) => Some(Part::Literal(text.clone())),
            Segment::Placeholder(p) if p.root == "self" => Some(Part::SelfField(p.fields.clone())),
            Segment::Placeholder(p) => func
                .param(&p.root)
                .map(|param| Part::Param(*param, p.fields.clone())),
        })
        .collect();
    let values = parts
        .iter()
        .filter(|p| !matches!(p, Part::Literal(_)))
        .count();
    Key {
        literal,
        parts,
        capacity: template.literal_len() + 8 * values + 4,
    }
}

fn parse_template(key: &LitStr, errors: &mut Errors) -> Option<Template> {
    match template::parse(&key.value()) {
        Ok(t) => Some(t),
        Err(template_errors) => {
            for e in template_errors {
                errors.spanned(key, e);
            }
            None
        }
    }
}

/// What a template's placeholders name.
#[derive(Default)]
struct Placeholders<'t> {
    /// Parameters named by some placeholder.
    in_key: Vec<&'t str>,
    /// Parameters that an unknown placeholder was probably meant to name: the
    /// "did you mean" already covers them, so "not in the key" would be noise.
    suggested: Vec<String>,
    /// Whether some placeholder reads `<self...>`.
    uses_self: bool,
}

/// Checks that every placeholder names a parameter (or `self`, when there is
/// one); the same errors for `#[redis_cached]` and `#[invalidates]` keys.
fn resolve_placeholders<'t>(
    func: &AnnotatedFn,
    template: &'t Template,
    key: &LitStr,
    errors: &mut Errors,
) -> Placeholders<'t> {
    let mut found = Placeholders::default();
    for placeholder in template.placeholders() {
        let root = placeholder.root.as_str();
        if root == "self" {
            if func.receiver.is_none() {
                errors.spanned(
                    key,
                    format!(
                        "placeholder `{placeholder}` reads `self`, but `{}` has no `self` parameter\n\
                         help: name one of its parameters instead",
                        func.name()
                    ),
                );
            }
            found.uses_self = true;
        } else if func.param(root).is_some() {
            found.in_key.push(root);
        } else {
            let (message, suggestion) = unknown_placeholder(func, root, &placeholder.to_string());
            errors.spanned(key, message);
            found.suggested.extend(suggestion);
        }
    }
    found
}

fn param_list(func: &AnnotatedFn) -> String {
    if func.params.is_empty() {
        return "it has no parameters".to_owned();
    }
    let names: Vec<String> = func
        .params
        .iter()
        .map(|p| format!("`{}`", p.ident))
        .collect();
    format!("its parameters are {}", names.join(", "))
}

/// The message, and the parameter it suggests.
fn unknown_placeholder(
    func: &AnnotatedFn,
    root: &str,
    placeholder: &str,
) -> (String, Option<String>) {
    let candidates: Vec<String> = func.params.iter().map(|p| p.ident.to_string()).collect();
    let suggestion = did_you_mean(root, candidates.iter().map(String::as_str)).map(str::to_owned);
    let hint = hint(suggestion.as_deref());
    let message = format!(
        "unknown placeholder `{placeholder}`: `{}` has no parameter `{root}`{hint}\n\
         help: {}",
        func.name(),
        param_list(func)
    );
    (message, suggestion)
}

/// `batch`: exactly one placeholder names a collection parameter, bare;
/// the result is a map (or a `Result` of one); no refresh options.
fn check_batch<'a>(
    func: &AnnotatedFn<'a>,
    args: &Args,
    template: Option<&Template>,
    in_key: &[&str],
    span: Span,
    errors: &mut Errors,
) -> Option<Batch<'a>> {
    let mut ok = true;
    if !matches!(func.output.shape, Shape::Result | Shape::Plain) {
        ok = false;
        errors.at(
            span,
            "a `batch` function returns a map of ids to values: `HashMap<Id, V>`, `BTreeMap<Id, V>`, or a `Result` of one",
        );
    }
    if args.stale_millis.is_some()
        || args.early_refresh.is_some()
        || args.fail_safe.is_some()
        || args.soft_timeout.is_some()
    {
        ok = false;
        errors.at(
            span,
            "`batch` does not refresh entries: remove `stale`, `early_refresh`, `fail_safe` and `soft_timeout`, or cache the single lookup instead",
        );
    }
    let collections: Vec<(&Param<'a>, &'a Type)> = func
        .params
        .iter()
        .filter(|p| in_key.contains(&p.ident.to_string().as_str()))
        .filter_map(|p| types::element_type(p.ty).map(|element| (p, element)))
        .collect();
    let [(param, element)] = collections[..] else {
        errors.at(
            span,
            format!(
                "`batch` needs exactly one placeholder that names a collection of ids, found {}\n\
                 help: e.g. `key = \"user:<ids>\"` with `ids: &[u64]`, `Vec<u64>` or `impl IntoIterator<Item = u64>`",
                collections.len()
            ),
        );
        return None;
    };
    if let Some((ty, list)) = batch_map(func).and_then(|ty| Some((ty, types::not_a_map(ty)?))) {
        ok = false;
        let value = list_value(list).map_or_else(|| "V".to_owned(), types::text);
        errors.spanned(
            ty,
            format!(
                "a `batch` function returns a map from each id to its value, not `{list}`\n\
                 help: return `HashMap<{id}, {value}>` or `BTreeMap<{id}, {value}>` (or a `Result` of one); \
                 the body leaves out the ids it did not find",
                list = types::text(list),
                id = types::text(element),
            ),
        );
    }
    if matches!(types::strip_reference(param.ty), Type::Array(_)) {
        ok = false;
        errors.spanned(
            param.arg,
            "a `batch` parameter cannot be an array: the body is given the missing ids only\n\
             help: take a slice, `&[T]`",
        );
    }
    let with_fields = template.is_some_and(|t| {
        t.placeholders()
            .any(|p| *param.ident == p.root && !p.fields.is_empty())
    });
    if with_fields {
        ok = false;
        errors.at(
            span,
            format!(
                "`<{}>` is the batch: each id renders as a whole, so it takes no `.field`",
                param.ident
            ),
        );
    }
    ok.then_some(Batch {
        param: *param,
        element,
    })
}

/// The map type of a batch function: its return type, or the `Ok` type of
/// its `Result`.
fn batch_map<'a>(func: &AnnotatedFn<'a>) -> Option<&'a Type> {
    let ty = func.output.ty?;
    match func.output.shape {
        Shape::Plain => Some(ty),
        Shape::Result => first_type_argument(ty),
        Shape::Option | Shape::ResultOption => None,
    }
}

/// The element of a list, slice or array type, for the help line.
fn list_value(list: &Type) -> Option<&Type> {
    match types::strip_reference(list) {
        Type::Slice(slice) => Some(&slice.elem),
        Type::Array(array) => Some(&array.elem),
        // A set's element is an id, not a value.
        list => match crate::ast::last_segment(list)? {
            (ident, _) if ident.to_string().ends_with("Set") => None,
            (_, first) => first,
        },
    }
}

/// `T` of `Name<T, ...>`.
fn first_type_argument(ty: &Type) -> Option<&Type> {
    crate::ast::last_segment(types::strip_reference(ty))?.1
}

/// `fail_safe` needs a result that can fail; `soft_timeout` an old value to
/// answer with meanwhile.
fn check_fail_safe(func: &AnnotatedFn, args: &Args, errors: &mut Errors) {
    if let Some((_, span)) = args.fail_safe
        && !matches!(func.output.shape, Shape::Result | Shape::ResultOption)
    {
        errors.at(
            span,
            format!(
                "`fail_safe` answers with a kept value when the body fails, but `{}` cannot fail\n\
                 help: it applies to functions that return `Result<T, E>` or `Result<Option<T>, E>`",
                func.name()
            ),
        );
    }
    if let Some((_, span)) = args.soft_timeout
        && args.fail_safe.is_none()
        && args.stale_millis.is_none()
    {
        errors.at(
            span,
            "`soft_timeout` answers with the old value when the body is slow, and keeps none by itself\n\
             help: add `fail_safe = \"...\"` (kept past freshness for failures) or `stale = \"...\"`",
        );
    }
}

/// `cache_none` and `none_ttl` need a result with an answer of nothing.
fn check_negative(func: &AnnotatedFn, args: &Args, errors: &mut Errors) {
    let spans = args
        .cache_none
        .iter()
        .map(|span| ("cache_none", *span))
        .chain(args.none_ttl.iter().map(|(_, span)| ("none_ttl", *span)));
    for (name, span) in spans {
        // In a batch, an id the body does not return is the answer of nothing.
        if args.batch.is_none() && !matches!(func.output.shape, Shape::Option | Shape::ResultOption)
        {
            errors.at(
                span,
                format!(
                    "`{name}` caches an answer of `None`, but `{}` cannot return one\n\
                     help: it applies to functions that return `Option<T>` or `Result<Option<T>, E>`",
                    func.name()
                ),
            );
        }
    }
}

fn check_skip(func: &AnnotatedFn, skip: &[Ident], in_key: &[&str], errors: &mut Errors) {
    for (i, ident) in skip.iter().enumerate() {
        let name = ident.to_string();
        if skip[..i].iter().any(|earlier| *earlier == name) {
            errors.spanned(
                ident,
                format!("`{name}` is listed twice in `skip(...)`\nhelp: remove one of them"),
            );
        } else if name == "self" {
            errors.spanned(
                ident,
                "`self` is never part of the key unless the template names `<self.field>`; remove it from `skip(...)`",
            );
        } else if func.param(&name).is_none() {
            let candidates: Vec<String> = func
                .params
                .iter()
                .map(|p: &Param| p.ident.to_string())
                .collect();
            let hint = hint(did_you_mean(&name, candidates.iter().map(String::as_str)));
            errors.spanned(
                ident,
                format!(
                    "`skip({name})` names no parameter of `{}`{hint}\nhelp: {}",
                    func.name(),
                    param_list(func)
                ),
            );
        } else if in_key.contains(&name.as_str()) {
            errors.spanned(
                ident,
                format!("`{name}` is in the key template and in `skip(...)`; it can only be one\nhelp: remove it from `skip(...)`"),
            );
        }
    }
}

/// A validated `#[invalidates]` or `#[cache_put]`.
pub struct WritePlan<'a> {
    pub kind: WriteKind,
    /// The function as statistics name it, after the module path.
    pub stats_name: String,
    pub func: AnnotatedFn<'a>,
    pub targets: Vec<PlannedTarget<'a>>,
    pub cache: Option<&'a Expr>,
    /// `#[write_behind]`'s queue.
    pub queue: Option<&'a Expr>,
    pub krate: Path,
}

/// A target whose template, if any, has been checked and resolved.
pub enum PlannedTarget<'a> {
    /// A call of the cached function; rustc checks it against `<fn>_cache_key`.
    Call(&'a Expr),
    /// A call whose arguments name `ret`, the written result: its key is
    /// rendered after the body returned. With the user's `ret`, whose span
    /// the closure's parameter takes.
    AfterCall(&'a Expr, &'a Ident),
    /// A template over the writer's parameters.
    Template(Key<'a>),
    /// A tag's template over the writer's parameters.
    Tag(Key<'a>),
}

/// The name of the written result in a target's arguments.
const RESULT: &str = "ret";

/// Whether the arguments of a call target name `ret`, the written result
/// (its `Ok` value, or the value of a function without `Result`). Such a
/// key is rendered after the body, from the result alone: the parameters
/// have been moved into the body by then, so naming one beside `ret` is
/// an error, as is `ret` in a put's target or beside a parameter of that
/// name.
fn names_the_result<'a>(
    func: &AnnotatedFn,
    target: &'a Expr,
    kind: WriteKind,
    errors: &mut Errors,
) -> Option<&'a Ident> {
    let args = match target {
        Expr::Call(call) => &call.args,
        Expr::MethodCall(call) => &call.args,
        _ => return None,
    };
    let mut names = Names(Vec::new());
    for arg in args {
        syn::visit::Visit::visit_expr(&mut names, arg);
    }
    let ret = *names.0.iter().find(|name| **name == RESULT)?;
    if func.params.iter().any(|p| p.ident == RESULT) {
        errors.spanned(
            ret,
            "`ret` in a target names the written result, and this function has a parameter named `ret`\n\
             help: rename the parameter",
        );
        return None;
    }
    if kind != WriteKind::Invalidates {
        errors.spanned(
            ret,
            format!(
                "`#[{}]` renders its key before the body runs, so it cannot name the result `ret`\n\
                 help: name the parameters the key is made of; to invalidate keys made from the result, use `#[invalidates(...)]`",
                kind.attribute()
            ),
        );
        return None;
    }
    for name in &names.0 {
        if let Some(param) = func.params.iter().find(|p| p.ident == *name) {
            errors.spanned(
                name,
                format!(
                    "a target that names the result `ret` is rendered after the body returned, from the result alone: the parameter `{}` has been moved into the body by then\n\
                     help: make it a field of the result, or give this key a target of its own that names only parameters",
                    param.ident
                ),
            );
        }
    }
    Some(ret)
}

/// The one-segment paths an expression names (`ret`, `id` in `&ret.sku`,
/// `f(id)`): values, or functions called by name.
struct Names<'a>(Vec<&'a Ident>);

impl<'a> syn::visit::Visit<'a> for Names<'a> {
    fn visit_expr_path(&mut self, path: &'a syn::ExprPath) {
        if path.qself.is_none()
            && let Some(ident) = path.path.get_ident()
        {
            self.0.push(ident);
        }
    }
}

pub fn validate_write<'a>(
    kind: WriteKind,
    args: &'a WriteArgs,
    func: AnnotatedFn<'a>,
    owner: Option<&str>,
    errors: &mut Errors,
) -> Option<WritePlan<'a>> {
    let attribute = kind.attribute();
    let sig = &func.item.sig;
    if matches!(func.asyncness, Asyncness::Not) {
        errors.spanned(
            sig.fn_token,
            format!(
                "`#[{attribute}]` needs an `async fn`: it updates the cache after the write, which is network I/O\n\
                 help: declare it as `async fn {}(...)`",
                sig.ident
            ),
        );
    }
    // Arguments that were written but rejected have been reported already.
    if args.written == 0 {
        let example = match kind {
            WriteKind::Invalidates => {
                "`#[invalidates(get_user(id))]` or `#[invalidates(key = \"user:<id>\")]`"
            }
            WriteKind::CachePut => "`#[cache_put(get_user(id))]`",
            WriteKind::WriteBehind => "`#[write_behind(get_user(id), queue = USERS)]`",
        };
        errors.at(
            Span::call_site(),
            format!("`#[{attribute}]` needs a target: the cached function whose entry this write changes\nhelp: e.g. {example}"),
        );
    }
    if kind == WriteKind::WriteBehind && !args.queue_given && args.written > 0 {
        errors.at(
            Span::call_site(),
            "`#[write_behind]` needs a queue: the `WriteQueue` its changes are flushed from\n\
             help: e.g. `#[write_behind(get_user(id), queue = USERS)]` with `const USERS: cache_runtime::WriteQueue<User> = cache_runtime::WriteQueue::new(\"users\");`",
        );
    }
    let mut targets = Vec::new();
    for (i, target) in args.targets.iter().enumerate() {
        match (kind, target) {
            (WriteKind::WriteBehind, Target::Tag(tag)) => errors.spanned(
                tag,
                "`#[write_behind]` stores one entry and queues its change; a tag is invalidated\n\
                 help: give the write its cached function, e.g. `#[write_behind(get_user(id), queue = USERS)]`",
            ),
            (WriteKind::WriteBehind, _) if i > 0 => errors.spanned(
                target_tokens(target),
                "`#[write_behind]` stores one value under one key: give it one target",
            ),
            (WriteKind::WriteBehind, Target::Template(key)) => errors.spanned(
                key,
                "`#[write_behind]` needs the cached function itself, not a key template: it stores with that function's TTL and value type\n\
                 help: e.g. `#[write_behind(get_user(id), queue = USERS)]`",
            ),
            (WriteKind::CachePut, Target::Tag(tag)) => errors.spanned(
                tag,
                "`#[cache_put]` stores one entry; a tag is invalidated\n\
                 help: make this write `#[invalidates(tag = \"...\")]` instead (a put beside a tag's invalidation stores an entry the invalidation kills)",
            ),
            (WriteKind::CachePut, _) if i > 0 => errors.spanned(
                target_tokens(target),
                "`#[cache_put]` stores one value under one key: give it one target\n\
                 help: use `#[invalidates(...)]` for the other keys this write changes",
            ),
            (WriteKind::CachePut, Target::Template(key)) => errors.spanned(
                key,
                "`#[cache_put]` needs the cached function itself, not a key template: it stores with that function's TTL and value type\n\
                 help: e.g. `#[cache_put(get_user(id))]`",
            ),
            (kind, Target::Call(expr)) => match names_the_result(&func, expr, kind, errors) {
                Some(ret) => targets.push(PlannedTarget::AfterCall(expr, ret)),
                None => targets.push(PlannedTarget::Call(expr)),
            },
            (WriteKind::Invalidates, Target::Tag(tag)) => {
                if let Some(template) = parse_template(tag, errors) {
                    resolve_placeholders(&func, &template, tag, errors);
                    targets.push(PlannedTarget::Tag(resolve(&func, &template, tag)));
                }
            }
            (WriteKind::Invalidates, Target::Template(key)) => {
                if let Some(template) = parse_template(key, errors) {
                    resolve_placeholders(&func, &template, key, errors);
                    targets.push(PlannedTarget::Template(resolve(&func, &template, key)));
                }
            }
        }
    }
    if errors.has_errors() {
        return None;
    }
    Some(WritePlan {
        kind,
        stats_name: stats_name(owner, func.name()),
        func,
        targets,
        cache: args.cache.as_ref(),
        queue: args.queue.as_ref(),
        krate: args
            .krate
            .clone()
            .unwrap_or_else(|| syn::parse_quote!(::cache_runtime)),
    })
}

fn target_tokens(target: &Target) -> proc_macro2::TokenStream {
    match target {
        Target::Call(expr) => quote::quote!(#expr),
        Target::Template(key) | Target::Tag(key) => quote::quote!(#key),
    }
}
