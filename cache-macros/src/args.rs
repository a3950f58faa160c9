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

const ARGUMENTS: &[&str] = &["key", "ttl", "skip", "jitter", "version", "cache", "crate"];

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
                "ttl" => args.ttl = parse_ttl(&meta.value()?.parse()?, errors),
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

const TTL_HELP: &str = "help: write whole seconds (`ttl = 60`) or a duration string (`ttl = \"5m\"`, `ttl = \"1h 30m\"`)";

fn parse_ttl(expr: &Expr, errors: &mut Errors) -> Option<Ttl> {
    let duration = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(int), ..
        }) => match int.base10_parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                errors.spanned(
                    int,
                    format!("`ttl` is not a valid number of seconds\n{TTL_HELP}"),
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
                    format!("`ttl = {:?}` is not a duration: {e}\n{TTL_HELP}", s.value()),
                );
                return None;
            }
        },
        other => {
            errors.spanned(
                other,
                format!("`ttl` must be an integer literal or a string literal\n{TTL_HELP}"),
            );
            return None;
        }
    };
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        errors.spanned(
            expr,
            "`ttl` must be at least 1 ms: an entry that never expires stays stale forever, and 0 would cache nothing\n\
             help: pick how long a stale answer is acceptable, e.g. `ttl = 60`",
        );
        return None;
    }
    // Redis stores expiry as a signed 64-bit millisecond timestamp.
    if millis > i64::MAX as u64 / 2 {
        errors.spanned(expr, format!("`ttl` is too large\n{TTL_HELP}"));
        return None;
    }
    Some(Ttl { millis })
}

fn parse_jitter(expr: &Expr, errors: &mut Errors) -> Option<f64> {
    let value = match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Float(f), ..
        }) => f.base10_parse::<f64>().ok(),
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i.base10_parse::<u32>().ok().map(f64::from),
        _ => None,
    };
    match value {
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
