//! Every check that relates the arguments, the key template and the function
//! to each other. All errors are collected; a `Plan` comes out only when there
//! are none.

use proc_macro2::Span;
use syn::{Expr, Ident, LitStr, Path};

use crate::args::{Args, SingleFlight, Target, WriteArgs, WriteKind};
use crate::ast::{AnnotatedFn, Param};
use crate::ctxt::{Errors, did_you_mean, hint};
use crate::template::{self, Template};

/// A validated `#[redis_cached]`: everything `expand` needs, nothing it must check.
pub struct Plan<'a> {
    pub func: AnnotatedFn<'a>,
    pub template: Template,
    pub key: &'a LitStr,
    pub ttl_millis: u64,
    pub jitter: f64,
    pub single_flight: SingleFlight,
    pub stale_millis: Option<u64>,
    pub early_refresh: Option<f64>,
    pub version: Option<u32>,
    pub cache: Option<&'a Expr>,
    pub krate: Path,
    /// Parameters that appear in the key, in declaration order.
    pub key_params: Vec<Param<'a>>,
    /// Whether the template reads `<self...>`.
    pub uses_self: bool,
}

pub fn validate<'a>(
    args: &'a Args,
    func: AnnotatedFn<'a>,
    errors: &mut Errors,
) -> Option<Plan<'a>> {
    let sig = &func.item.sig;
    if sig.asyncness.is_none() {
        errors.spanned(
            sig.fn_token,
            format!(
                "`#[redis_cached]` needs an `async fn`: reaching the cache is network I/O\n\
                 help: declare it as `async fn {}(...)`",
                sig.ident
            ),
        );
    }
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

    check_skip(&func, &args.skip, &in_key, errors);

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

    let key_params = func
        .params
        .iter()
        .filter(|p| in_key.iter().any(|k| p.ident == k))
        .copied()
        .collect();
    let (Some(template), Some(key), Some(ttl)) = (template, args.key.as_ref(), args.ttl.as_ref())
    else {
        return None;
    };
    Some(Plan {
        func,
        template,
        key,
        ttl_millis: ttl.millis,
        jitter: args.jitter.unwrap_or(0.0),
        single_flight: args.single_flight,
        stale_millis: args.stale_millis,
        early_refresh: args.early_refresh,
        version: args.version,
        cache: args.cache.as_ref(),
        krate: args
            .krate
            .clone()
            .unwrap_or_else(|| syn::parse_quote!(::cache_runtime)),
        key_params,
        uses_self,
    })
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
    pub func: AnnotatedFn<'a>,
    pub targets: Vec<PlannedTarget<'a>>,
    pub cache: Option<&'a Expr>,
    pub krate: Path,
}

/// A target whose template, if any, has been checked.
pub enum PlannedTarget<'a> {
    /// A call of the cached function; rustc checks it against `<fn>_cache_key`.
    Call(&'a Expr),
    /// A template over the writer's parameters.
    Template { template: Template, key: &'a LitStr },
}

pub fn validate_write<'a>(
    kind: WriteKind,
    args: &'a WriteArgs,
    func: AnnotatedFn<'a>,
    errors: &mut Errors,
) -> Option<WritePlan<'a>> {
    let attribute = kind.attribute();
    let sig = &func.item.sig;
    if sig.asyncness.is_none() {
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
        };
        errors.at(
            Span::call_site(),
            format!("`#[{attribute}]` needs a target: the cached function whose entry this write changes\nhelp: e.g. {example}"),
        );
    }
    let mut targets = Vec::new();
    for (i, target) in args.targets.iter().enumerate() {
        match (kind, target) {
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
            (_, Target::Call(expr)) => targets.push(PlannedTarget::Call(expr)),
            (WriteKind::Invalidates, Target::Template(key)) => {
                if let Some(template) = parse_template(key, errors) {
                    resolve_placeholders(&func, &template, key, errors);
                    targets.push(PlannedTarget::Template { template, key });
                }
            }
        }
    }
    if errors.has_errors() {
        return None;
    }
    Some(WritePlan {
        kind,
        func,
        targets,
        cache: args.cache.as_ref(),
        krate: args
            .krate
            .clone()
            .unwrap_or_else(|| syn::parse_quote!(::cache_runtime)),
    })
}

fn target_tokens(target: &Target) -> proc_macro2::TokenStream {
    match target {
        Target::Call(expr) => quote::quote!(#expr),
        Target::Template(key) => quote::quote!(#key),
    }
}
