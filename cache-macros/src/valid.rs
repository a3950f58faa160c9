//! Every check that relates the arguments, the key template and the function
//! to each other. All errors are collected; a `Plan` comes out only when there
//! are none.

use proc_macro2::Span;
use syn::{Expr, Ident, LitStr, Path};

use crate::args::Args;
use crate::ast::{CachedFn, Param};
use crate::ctxt::{Errors, did_you_mean, hint};
use crate::template::{self, Template};

/// A validated `#[redis_cached]`: everything `expand` needs, nothing it must check.
pub struct Plan<'a> {
    pub func: CachedFn<'a>,
    pub template: Template,
    pub key: &'a LitStr,
    pub ttl_millis: u64,
    pub jitter: f64,
    pub version: Option<u32>,
    pub cache: Option<&'a Expr>,
    pub krate: Path,
    /// Parameters that appear in the key, in declaration order.
    pub key_params: Vec<Param<'a>>,
    /// Whether the template reads `<self...>`.
    pub uses_self: bool,
}

pub fn validate<'a>(args: &'a Args, func: CachedFn<'a>, errors: &mut Errors) -> Option<Plan<'a>> {
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

    let template = args
        .key
        .as_ref()
        .and_then(|key| match template::parse(&key.value()) {
            Ok(t) => Some(t),
            Err(template_errors) => {
                for e in template_errors {
                    errors.spanned(key, e);
                }
                None
            }
        });

    let mut uses_self = false;
    let mut in_key: Vec<&str> = Vec::new();
    // Parameters that an unknown placeholder was probably meant to name: the
    // "did you mean" already covers them, so "not in the key" would be noise.
    let mut suggested: Vec<String> = Vec::new();
    if let (Some(t), Some(key)) = (&template, &args.key) {
        for placeholder in t.placeholders() {
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
                uses_self = true;
            } else if func.param(root).is_some() {
                in_key.push(root);
            } else {
                let (message, suggestion) =
                    unknown_placeholder(&func, root, &placeholder.to_string());
                errors.spanned(key, message);
                suggested.extend(suggestion);
            }
        }
    }

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

fn param_list(func: &CachedFn) -> String {
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
fn unknown_placeholder(func: &CachedFn, root: &str, placeholder: &str) -> (String, Option<String>) {
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

fn check_skip(func: &CachedFn, skip: &[Ident], in_key: &[&str], errors: &mut Errors) {
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
