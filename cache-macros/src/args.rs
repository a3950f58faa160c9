//! The arguments of `#[redis_cached(...)]`, parsed with `syn::meta::parser`.
//! Each argument's own value is checked here (a zero TTL, a malformed duration);
//! checks that relate arguments to the function live in `valid`.

use std::time::Duration;

use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitStr, Path, Token};

use crate::ctxt::{Errors, did_you_mean, hint};

const ARGUMENTS: &[&str] = &[
    "key",
    "ttl",
    "skip",
    "jitter",
    "single_flight",
    "stale",
    "early_refresh",
    "cache_none",
    "none_ttl",
    "batch",
    "local",
    "tags",
    "tags_from",
    "ttl_from",
    "unless",
    "fail_safe",
    "soft_timeout",
    "version",
    "cache",
    "crate",
];

/// `single_flight` / `single_flight = "distributed"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SingleFlight {
    #[default]
    Off,
    Local,
    Distributed,
}

/// `ttl = 60` or `ttl = "5m"`, in milliseconds.
pub struct Ttl {
    pub millis: u64,
}

/// Parsed arguments. A missing required argument stays `None` and is
/// reported by `valid`, together with everything else.
#[derive(Default)]
pub struct Args {
    pub key: Option<LitStr>,
    pub ttl: Option<Ttl>,
    pub skip: Vec<Ident>,
    pub jitter: Option<f64>,
    pub single_flight: SingleFlight,
    /// `stale = "30s"`, in milliseconds.
    pub stale_millis: Option<u64>,
    /// `early_refresh` (β = 1) or `early_refresh = β`.
    pub early_refresh: Option<f64>,
    /// `cache_none`: the span of the flag, for errors.
    pub cache_none: Option<proc_macro2::Span>,
    /// `none_ttl = "5s"`, in milliseconds, and the span of its value.
    pub none_ttl: Option<(u64, proc_macro2::Span)>,
    /// `fail_safe = "1h"`, in milliseconds, and the span of its value.
    pub fail_safe: Option<(u64, proc_macro2::Span)>,
    /// `soft_timeout = "150ms"`, in milliseconds, and the span of its value.
    pub soft_timeout: Option<(u64, proc_macro2::Span)>,
    /// `batch`: the span of the flag, for errors.
    pub batch: Option<proc_macro2::Span>,
    /// `local = "5s"`, in milliseconds.
    pub local_millis: Option<u64>,
    /// `tags = ["org:<org_id>", ...]`: templates, checked like the key's.
    pub tags: Vec<LitStr>,
    /// The span of `tags`, for errors.
    pub tags_span: Option<proc_macro2::Span>,
    /// `tags_from = path`: a function of the value that names tags of its
    /// own.
    pub tags_from: Option<Path>,
    /// `ttl_from = path`: a function of the value that chooses its TTL.
    pub ttl_from: Option<Path>,
    /// `unless = path`: a function of the value that says not to store it.
    pub unless: Option<Path>,
    pub version: Option<u32>,
    pub cache: Option<Expr>,
    pub krate: Option<Path>,
    /// Names of the recognised arguments that were written, malformed or not.
    pub given: Vec<String>,
}

impl Args {
    /// Parses the attribute's arguments, recording every error in `errors`.
    pub fn parse(tokens: TokenStream, errors: &mut Errors) -> Args {
        let mut args = Args::default();
        let parser = syn::meta::parser(|meta| {
            let name = match meta.path.get_ident() {
                Some(ident) => ident.to_string(),
                None => {
                    errors.spanned(
                        &meta.path,
                        "expected an argument name such as `key` or `ttl`",
                    );
                    return skip_value(meta.input);
                }
            };
            let name_span = meta.path.span();
            if ARGUMENTS.contains(&name.as_str()) {
                if args.given.contains(&name) {
                    errors.at(
                        name_span,
                        format!("duplicate `{name}` argument\nhelp: remove one of them"),
                    );
                    return skip_value(meta.input);
                }
                args.given.push(name.clone());
            }
            match name.as_str() {
                "key" => args.key = Some(meta.value()?.parse()?),
                "ttl" => args.ttl = parse_duration("ttl", &meta.value()?.parse()?, errors),
                "skip" => {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    let names = Punctuated::<Ident, Token![,]>::parse_terminated_with(
                        &content,
                        Ident::parse_any,
                    )?;
                    args.skip.extend(names);
                }
                "jitter" => args.jitter = parse_jitter(&meta.value()?.parse()?, errors),
                "single_flight" => {
                    args.single_flight = if meta.input.peek(Token![=]) {
                        let mode: LitStr = meta.value()?.parse()?;
                        match mode.value().as_str() {
                            "local" => SingleFlight::Local,
                            "distributed" => SingleFlight::Distributed,
                            _ => {
                                errors.spanned(
                                    &mode,
                                    "`single_flight` is a flag, or `single_flight = \"distributed\"` to share one computation across processes (`\"local\"` is the flag's meaning)",
                                );
                                SingleFlight::Local
                            }
                        }
                    } else {
                        SingleFlight::Local
                    };
                }
                "stale" => {
                    args.stale_millis =
                        parse_duration("stale", &meta.value()?.parse()?, errors).map(|t| t.millis);
                }
                "early_refresh" => {
                    args.early_refresh = if meta.input.peek(Token![=]) {
                        parse_beta(&meta.value()?.parse()?, errors)
                    } else {
                        Some(1.0)
                    };
                }
                "cache_none" | "batch" if meta.input.peek(Token![=]) => {
                    let help = if name == "cache_none" {
                        "help: write `cache_none` to cache `None` for the TTL, or `none_ttl = \"5s\"` for a TTL of its own"
                    } else {
                        "help: write `batch`; the key's placeholder that names a collection is the batch"
                    };
                    errors.at(
                        name_span,
                        format!("`{name}` is a flag and takes no value\n{help}"),
                    );
                    return skip_value(meta.input);
                }
                "cache_none" => args.cache_none = Some(name_span),
                "none_ttl" => {
                    let value: Expr = meta.value()?.parse()?;
                    args.none_ttl = parse_duration("none_ttl", &value, errors)
                        .map(|t| (t.millis, value.span()));
                }
                "fail_safe" => {
                    let value: Expr = meta.value()?.parse()?;
                    args.fail_safe = parse_duration("fail_safe", &value, errors)
                        .map(|t| (t.millis, value.span()));
                }
                "soft_timeout" => {
                    let value: Expr = meta.value()?.parse()?;
                    args.soft_timeout = parse_duration("soft_timeout", &value, errors)
                        .map(|t| (t.millis, value.span()));
                }
                "batch" => args.batch = Some(name_span),
                "tags" => {
                    args.tags_span = Some(name_span);
                    args.tags = parse_tags(&meta.value()?.parse()?, errors);
                }
                "tags_from" => {
                    args.tags_from = parse_path(
                        "tags_from",
                        "tags_from = product_tags` with `fn product_tags(value: &V) -> Vec<String>",
                        meta.value()?.parse()?,
                        errors,
                    );
                }
                "ttl_from" => {
                    args.ttl_from = parse_path(
                        "ttl_from",
                        "ttl_from = order_ttl` with `fn order_ttl(value: &V) -> Option<Duration>",
                        meta.value()?.parse()?,
                        errors,
                    );
                }
                "unless" => {
                    args.unless = parse_path(
                        "unless",
                        "unless = is_draft` with `fn is_draft(value: &V) -> bool",
                        meta.value()?.parse()?,
                        errors,
                    );
                }
                "local" => {
                    args.local_millis =
                        parse_duration("local", &meta.value()?.parse()?, errors).map(|t| t.millis);
                }
                "version" => {
                    let lit: syn::LitInt = meta.value()?.parse()?;
                    match lit.base10_parse::<u32>() {
                        Ok(v) => args.version = Some(v),
                        Err(_) => errors
                            .spanned(&lit, "`version` must be a whole number, e.g. `version = 2`"),
                    }
                }
                "cache" => args.cache = Some(meta.value()?.parse()?),
                "crate" => {
                    let lit: LitStr = meta.value()?.parse()?;
                    match lit.parse::<Path>() {
                        Ok(path) => args.krate = Some(path),
                        Err(_) => errors.spanned(
                            &lit,
                            "`crate` must be a path, e.g. `crate = \"my_facade::cache\"`",
                        ),
                    }
                }
                other => {
                    let hint = hint(did_you_mean(other, ARGUMENTS.iter().copied()));
                    errors.at(
                        name_span,
                        format!(
                            "unknown argument `{other}`{hint}\nhelp: expected one of: {}",
                            ARGUMENTS
                                .iter()
                                .map(|a| format!("`{a}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    return skip_value(meta.input);
                }
            }
            Ok(())
        });
        if let Err(syntax) = parser.parse2(tokens) {
            errors.push(syntax);
        }
        args
    }
}

/// Consumes `= expr` or `(...)` after an argument that is being rejected, so
/// that parsing goes on with the next argument.
fn skip_value(input: ParseStream) -> syn::Result<()> {
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        input.parse::<Expr>()?;
    } else if input.peek(syn::token::Paren) {
        let _content;
        syn::parenthesized!(_content in input);
    }
    Ok(())
}

/// `tags_from = path` and its siblings: a path to a function of the value
/// (`example` shows one, between backticks).
fn parse_path(name: &str, example: &str, value: Expr, errors: &mut Errors) -> Option<Path> {
    match value {
        Expr::Path(path) if path.qself.is_none() => Some(path.path),
        other => {
            errors.spanned(
                &other,
                format!("`{name}` must be a path to a function, e.g. `{example}`"),
            );
            None
        }
    }
}

/// `ttl = 60`, `stale = "30s"`: whole seconds or a duration string, never 0.
fn parse_duration(name: &str, expr: &Expr, errors: &mut Errors) -> Option<Ttl> {
    let help = format!(
        "help: write whole seconds (`{name} = 60`) or a duration string (`{name} = \"5m\"`, `{name} = \"1h 30m\"`)"
    );
    let duration = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => match int.base10_parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                errors.spanned(
                    int,
                    format!("`{name}` is not a valid number of seconds\n{help}"),
                );
                return None;
            }
        },
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => match humantime::parse_duration(&s.value()) {
            Ok(d) => d,
            Err(e) => {
                errors.spanned(
                    s,
                    format!("`{name} = {:?}` is not a duration: {e}\n{help}", s.value()),
                );
                return None;
            }
        },
        other => {
            errors.spanned(
                other,
                format!("`{name}` must be an integer literal or a string literal\n{help}"),
            );
            return None;
        }
    };
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        let message = if name == "ttl" {
            "`ttl` must be at least 1 ms: an entry that never expires stays stale forever, and 0 would cache nothing\n\
             help: pick how long a stale answer is acceptable, e.g. `ttl = 60`"
                .to_owned()
        } else {
            format!("`{name}` must be at least 1 ms\nhelp: leave it out to turn it off")
        };
        errors.spanned(expr, message);
        return None;
    }
    // Redis stores expiry as a signed 64-bit millisecond timestamp.
    if millis > i64::MAX as u64 / 4 {
        errors.spanned(expr, format!("`{name}` is too large\n{help}"));
        return None;
    }
    Some(Ttl { millis })
}

/// `tags = ["org:<org_id>", "members"]`: string literals in brackets.
fn parse_tags(expr: &Expr, errors: &mut Errors) -> Vec<LitStr> {
    let help = "help: write the tags as templates in brackets, e.g. `tags = [\"org:<org_id>\", \"members\"]`";
    let Expr::Array(array) = expr else {
        errors.spanned(
            expr,
            format!("`tags` must be a list of string literals\n{help}"),
        );
        return Vec::new();
    };
    let mut tags = Vec::new();
    for element in &array.elems {
        match element {
            Expr::Lit(ExprLit {
                lit: Lit::Str(tag), ..
            }) => tags.push(tag.clone()),
            other => errors.spanned(other, format!("a tag must be a string literal\n{help}")),
        }
    }
    if array.elems.is_empty() {
        errors.spanned(
            array,
            format!("`tags` is empty\nhelp: leave it out, or {}", &help[6..]),
        );
    }
    tags
}

/// A float or integer literal.
fn number(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Float(f), ..
        }) => f.base10_parse::<f64>().ok(),
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i.base10_parse::<u32>().ok().map(f64::from),
        _ => None,
    }
}

/// XFetch's β: how eagerly to recompute before expiry (1 is the paper's
/// choice; more is earlier).
fn parse_beta(expr: &Expr, errors: &mut Errors) -> Option<f64> {
    match number(expr) {
        Some(v) if v > 0.0 && v <= 100.0 => Some(v),
        _ => {
            errors.spanned(
                expr,
                "`early_refresh = β` takes a number above 0 (at most 100)\n\
                 help: `early_refresh` alone means β = 1; larger β refreshes earlier",
            );
            None
        }
    }
}

fn parse_jitter(expr: &Expr, errors: &mut Errors) -> Option<f64> {
    match number(expr) {
        Some(v) if (0.0..1.0).contains(&v) => Some(v),
        _ => {
            errors.spanned(
                expr,
                "`jitter` must be a fraction from 0.0 up to (not including) 1.0\n\
                 help: `jitter = 0.1` spreads each TTL by up to ±10%",
            );
            None
        }
    }
}

/// Which write attribute is being expanded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Invalidates,
    CachePut,
    WriteBehind,
}

impl WriteKind {
    pub fn attribute(self) -> &'static str {
        match self {
            WriteKind::Invalidates => "invalidates",
            WriteKind::CachePut => "cache_put",
            WriteKind::WriteBehind => "write_behind",
        }
    }
}

const WRITE_ARGUMENTS: &[&str] = &["key", "tag", "queue", "cache", "crate"];

/// One target of `#[invalidates(...)]` or `#[cache_put(...)]`.
pub enum Target {
    /// `get_user(id)`, `Self::get_user(id)`, `users::get_user(id)` or
    /// `self.get_user(id)`: the cached function, called through its
    /// generated `<fn>_cache_key` so that rustc checks the arguments.
    Call(Expr),
    /// `key = "user:<id>"`: a template over the writer's own parameters.
    Template(LitStr),
    /// `tag = "org:<org_id>"`: a tag's template over the writer's own
    /// parameters (`#[invalidates]` only).
    Tag(LitStr),
}

/// The arguments of the write attributes: targets, then `cache = expr` and
/// `crate = "path"`. Parsed as expressions, so that a target can be any call.
#[derive(Default)]
pub struct WriteArgs {
    pub targets: Vec<Target>,
    pub cache: Option<Expr>,
    pub krate: Option<Path>,
    /// `queue = USERS` (`#[write_behind]` only): the `WriteQueue` constant.
    pub queue: Option<Expr>,
    /// Whether `queue = ...` was written, valid or not.
    pub queue_given: bool,
    /// How many arguments were written, valid or not.
    pub written: usize,
}

impl WriteArgs {
    /// Parses one attribute's arguments into `self`; called once per
    /// attribute when the attribute is repeated.
    pub fn parse(&mut self, kind: WriteKind, tokens: TokenStream, errors: &mut Errors) {
        let parser = Punctuated::<Expr, Token![,]>::parse_terminated;
        let items = match parser.parse2(tokens) {
            Ok(items) => items,
            Err(syntax) => {
                errors.push(syntax);
                return;
            }
        };
        self.written += items.len();
        for item in items {
            match item {
                Expr::Call(ref call) if matches!(*call.func, Expr::Path(_)) => {
                    self.targets.push(Target::Call(item));
                }
                Expr::MethodCall(_) => self.targets.push(Target::Call(item)),
                Expr::Assign(assign) => self.parse_named(kind, &assign, errors),
                other => errors.spanned(
                    &other,
                    format!(
                        "expected a cached function called with this function's values, e.g. `#[{0}(get_user(id))]` or `#[{0}(Self::get_user(user.id))]`",
                        kind.attribute()
                    ),
                ),
            }
        }
    }

    fn parse_named(&mut self, kind: WriteKind, assign: &syn::ExprAssign, errors: &mut Errors) {
        let name = match &*assign.left {
            Expr::Path(path) => path.path.get_ident().map(ToString::to_string).or_else(|| {
                // `crate` is a keyword, not an identifier.
                (path.path.segments.len() == 1 && path.path.segments[0].ident == "crate")
                    .then(|| "crate".to_owned())
            }),
            _ => None,
        };
        let value = &*assign.right;
        let string = match value {
            Expr::Lit(ExprLit {
                lit: Lit::Str(s), ..
            }) => Some(s),
            _ => None,
        };
        match name.as_deref() {
            Some("key") => match string {
                Some(lit) => self.targets.push(Target::Template(lit.clone())),
                None => errors.spanned(value, "`key` must be a string literal, e.g. `key = \"user:<id>\"`"),
            },
            Some("tag") => match string {
                Some(lit) => self.targets.push(Target::Tag(lit.clone())),
                None => errors.spanned(value, "`tag` must be a string literal, e.g. `tag = \"org:<org_id>\"`"),
            },
            Some("queue") if kind == WriteKind::WriteBehind => {
                if std::mem::replace(&mut self.queue_given, true) {
                    errors.spanned(
                        &assign.left,
                        "a second `queue` argument: a write goes to one queue\nhelp: remove one of them",
                    );
                } else if string.is_some() {
                    errors.spanned(
                        value,
                        "`queue` names a `WriteQueue` constant, not a string\nhelp: declare `const USERS: cache_runtime::WriteQueue<User> = cache_runtime::WriteQueue::new(\"users\");` and write `queue = USERS`",
                    );
                } else {
                    self.queue = Some(value.clone());
                }
            }
            Some("queue") => errors.spanned(
                &assign.left,
                format!(
                    "`queue` belongs on `#[write_behind(...)]`: `#[{}]` writes to the cache, not to a queue",
                    kind.attribute()
                ),
            ),
            // A repeated attribute may repeat the same `cache` or `crate`.
            Some("cache") => match &self.cache {
                Some(seen) if !same_tokens(seen, value) => errors.spanned(
                    &assign.left,
                    "a second, different `cache` argument: one function's keys go to one cache\nhelp: remove one of them",
                ),
                _ => self.cache = Some(value.clone()),
            },
            Some("crate") => match string.map(|s| s.parse::<Path>()) {
                Some(Ok(path)) => match &self.krate {
                    Some(seen) if !same_tokens(seen, &path) => errors.spanned(
                        &assign.left,
                        "a second, different `crate` argument\nhelp: remove one of them",
                    ),
                    _ => self.krate = Some(path),
                },
                _ => errors.spanned(
                    value,
                    "`crate` must be a path in a string, e.g. `crate = \"my_facade::cache\"`",
                ),
            },
            Some(name) if ARGUMENTS.contains(&name) => errors.spanned(
                &assign.left,
                format!(
                    "`{name}` belongs on the cached function's `#[redis_cached(...)]`: a write uses the target's settings"
                ),
            ),
            other => {
                let (name, hint) = match other {
                    Some(other) => (
                        format!(" `{other}`"),
                        hint(did_you_mean(other, WRITE_ARGUMENTS.iter().copied())),
                    ),
                    None => (String::new(), String::new()),
                };
                errors.spanned(
                    &assign.left,
                    format!(
                        "unknown argument{name}{hint}\nhelp: `#[{}]` takes cached-function calls such as `get_user(id)`, and `key = \"...\"`, `tag = \"...\"`, `cache = ...`, `crate = \"...\"`",
                        kind.attribute()
                    ),
                );
            }
        }
    }
}

fn same_tokens(a: &impl quote::ToTokens, b: &impl quote::ToTokens) -> bool {
    a.to_token_stream().to_string() == b.to_token_stream().to_string()
}

#[cfg(test)]
mod write_args_tests {
    use quote::quote;

    use super::*;

    #[test]
    fn targets_and_named_arguments_are_told_apart() {
        let mut errors = Errors::default();
        let mut args = WriteArgs::default();
        args.parse(
            WriteKind::Invalidates,
            quote!(
                get_user(id),
                Self::by_email(&req.email),
                self.org(org.id),
                key = "user:<id>",
                cache = self.cache,
                crate = "facade::cache"
            ),
            &mut errors,
        );
        assert!(errors.finish().is_ok());
        let calls = args
            .targets
            .iter()
            .filter(|t| matches!(t, Target::Call(_)))
            .count();
        assert_eq!((args.targets.len(), calls), (4, 3));
        assert!(args.cache.is_some() && args.krate.is_some());
    }

    #[test]
    fn anything_else_is_an_error() {
        let mut errors = Errors::default();
        let mut args = WriteArgs::default();
        args.parse(
            WriteKind::CachePut,
            quote!(42, tll = 5, ttl = 5, key = 7),
            &mut errors,
        );
        let message = errors.finish().err().map(|e| {
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        });
        let message = message.unwrap_or_default();
        assert!(message.contains("expected a cached function"), "{message}");
        assert!(message.contains("unknown argument `tll`"), "{message}");
        assert!(
            message.contains("`ttl` belongs on the cached function"),
            "{message}"
        );
        assert!(
            message.contains("`key` must be a string literal"),
            "{message}"
        );
    }
}
