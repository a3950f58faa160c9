//! Code generation. Glue only: build the key with the runtime's
//! `KeyBuilder`, then hand the body to one runtime function. Everything
//! this module needs was resolved by `valid` (placeholders) and `types`
//! (generics, nameable types).

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Expr, Ident, ItemFn, ReceiverKind, Type};

use crate::args::{SingleFlight, WriteKind};
use crate::ast::{AnnotatedFn, Asyncness, Param, Shape};
use crate::valid::{Batch, Key, KeyFn, Part, Plan, PlannedTarget, Stub, WritePlan};

/// The name of the generated key function: `get_user` → `get_user_cache_key`.
pub fn key_fn_name(name: &Ident) -> Ident {
    format_ident!("{}_cache_key", name)
}

/// What one attribute expands to, in parts: `#[cached_impl]` keeps the
/// method in the trait impl and moves the other items to an inherent impl.
pub struct Expansion {
    /// The annotated fn, rewritten (or unchanged, on error).
    pub method: TokenStream,
    /// Items beside it: the key function (or its stub).
    pub items: TokenStream,
    /// `compile_error!`s.
    pub errors: TokenStream,
}

impl Expansion {
    /// Everything, in place of the annotated fn.
    pub fn into_tokens(self) -> TokenStream {
        let Expansion {
            method,
            items,
            errors,
        } = self;
        quote!(#items #method #errors)
    }
}

pub fn expand(plan: &Plan) -> Expansion {
    Expansion {
        method: wrapper(plan),
        items: key_fn(plan),
        errors: TokenStream::new(),
    }
}

/// On error: the user's function unchanged plus the errors, so that callers
/// of the function see no follow-on errors; for `#[redis_cached]`, also a
/// stub of its key function, so that writers naming it see none either.
pub fn fallback(item: &ItemFn, errors: syn::Error, stub: Option<&Stub>) -> Expansion {
    let stub = stub.map(|stub| {
        let signature = key_fn_signature(&stub.func, &stub.key_vis, &stub.key_fn, &stub.krate);
        quote! {
            #[doc(hidden)]
            #[allow(unused_variables, clippy::all)]
            #signature {
                ::core::unimplemented!("`#[redis_cached]` did not compile")
            }
        }
    });
    Expansion {
        method: quote!(#item),
        items: quote!(#stub),
        errors: errors.into_compile_error(),
    }
}

fn key_fn(plan: &Plan) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let doc = format!(
        " The cache key of `{}` for these arguments, as `#[redis_cached(key = {:?})]` renders it.",
        func.name(),
        plan.key.literal.value()
    );
    let signature = key_fn_signature(func, &plan.key_vis, &plan.key_fn, krate);
    let site = Ident::new("REDIS_CACHED_SITE", Span::mixed_site());
    let builder = Ident::new("key", Span::mixed_site());
    let capacity = plan.key.capacity;
    let steps = key_steps(&plan.key, krate, &builder, ParamsAre::Borrowed);
    let tags = plan.tags.iter().map(|tag| {
        let capacity = tag.capacity;
        let steps = key_steps(tag, krate, &builder, ParamsAre::Borrowed);
        quote! {
            #krate::__private::KeyBuilder::tag(&mut #builder, #capacity);
            #(#steps)*
        }
    });
    let version = match plan.version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let fn_name = &plan.stats_name;
    let ttl = plan.ttl_millis;
    let jitter = plan.jitter;
    let single_flight = match plan.single_flight {
        SingleFlight::Off => None,
        SingleFlight::Local => Some(quote!(Local)),
        SingleFlight::Distributed => Some(quote!(Distributed)),
    }
    .map(|mode| quote!(.single_flight(#krate::__private::SingleFlight::#mode)));
    let stale = plan.stale_millis.map(|millis| quote!(.stale(#millis)));
    let early_refresh = plan.early_refresh.map(|beta| quote!(.early_refresh(#beta)));
    let cache_none = plan
        .none_ttl_millis
        .map(|millis| quote!(.cache_none(#millis)));
    let local = plan.local_millis.map(|millis| quote!(.local(#millis)));
    let tags_from = plan.tags_from.map(|_| quote!(.tags_from()));
    let fail_safe = plan
        .fail_safe_millis
        .map(|millis| quote!(.fail_safe(#millis)));
    let soft_timeout = plan
        .soft_timeout_millis
        .map(|millis| quote!(.soft_timeout(#millis)));
    // A `#[cache_put]` of the key obeys what its values decide.
    let finish = quote!(#builder.finish(#version));
    let finish = if plan.key_fn.value_nameable && (plan.ttl_from.is_some() || plan.unless.is_some())
    {
        let rules = rules(plan);
        quote!(#krate::__private::ruled(#finish, #rules))
    } else {
        finish
    };
    quote! {
        #[doc = #doc]
        #[must_use]
        #[allow(clippy::trivially_copy_pass_by_ref, clippy::ref_option_ref)]
        #signature {
            // The function's static configuration travels with its keys, so
            // that `#[cache_put]` stores with this function's TTL.
            static #site: #krate::__private::Site = #krate::__private::Site::new(
                ::core::concat!(::core::module_path!(), "::", #fn_name),
                #ttl,
                #jitter,
            )#single_flight #stale #early_refresh #cache_none #local #tags_from #fail_safe #soft_timeout;
            let mut #builder = #krate::__private::KeyBuilder::new(
                #capacity,
                ::core::option::Option::Some(&#site),
            );
            #(#steps)*
            #(#tags)*
            #finish
        }
    }
}

/// `vis fn <name>_cache_key<generics>(&self?, params…) -> CacheKey<V> where …`.
fn key_fn_signature(
    func: &AnnotatedFn,
    vis: &syn::Visibility,
    key_fn: &KeyFn,
    krate: &syn::Path,
) -> TokenStream {
    let name = key_fn_name(func.name());
    let receiver = key_fn.uses_self.then(|| quote!(&self,));
    let params = key_fn.params.iter().map(|Param { ident, ty, .. }| {
        let ty = key_param_type(ty);
        quote!(#ident: #ty)
    });
    let (impl_generics, _, where_clause) = key_fn.generics.split_for_impl();
    let value = cached_value_type(func, key_fn, krate);
    quote! {
        #vis fn #name #impl_generics (#receiver #(#params),*) -> #krate::CacheKey<#value> #where_clause
    }
}

/// A key function takes each key parameter by reference: `u64` as `&u64`,
/// but `&str` as `&str` (not `&&str`), so that a writer's `&(expr)` argument
/// deref-coerces from `&String` or `&&str` alike.
fn key_param_type(ty: &Type) -> TokenStream {
    match ty {
        Type::Reference(r) if r.mutability.is_none() => quote!(#ty),
        // `&impl A + B` would be ambiguous.
        Type::ImplTrait(_) | Type::TraitObject(_) => quote!(&(#ty)),
        _ => quote!(&#ty),
    }
}

/// The value type a key function's `CacheKey<V>` names: the cached part of
/// the return type, or `Untyped` when the key function cannot name it.
fn cached_value_type(func: &AnnotatedFn, key_fn: &KeyFn, krate: &syn::Path) -> TokenStream {
    if !key_fn.value_nameable {
        return quote!(#krate::Untyped);
    }
    let unit: Type = syn::parse_quote!(());
    let ret_ty = func.output.ty.unwrap_or(&unit);
    let shape = shape_ident(func.output.shape);
    let value_of = if key_fn.batch {
        quote!(BatchValueOf)
    } else {
        quote!(ValueOf)
    };
    // At the return type, like the other uses of the value type.
    respan(
        quote!(<#krate::__private::#shape as #krate::__private::#value_of<#ret_ty>>::Value),
        ret_span(func),
    )
}

/// How the key steps refer to a parameter: inside the key function, where
/// every key parameter already is a reference, or in the writer's own body.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParamsAre {
    Borrowed,
    Owned,
}

/// The `KeyBuilder` calls that render `key` into `builder`.
pub fn key_steps(
    key: &Key,
    krate: &syn::Path,
    builder: &Ident,
    params: ParamsAre,
) -> Vec<TokenStream> {
    // Located at the key, where the field is named, but marked as macro
    // output so that rustc does not suggest renaming the parameter.
    let field_span = key.literal.span().resolved_at(Span::mixed_site());
    let fields = |fields: &[String]| -> Vec<TokenStream> {
        fields
            .iter()
            .map(|f| match f.parse::<u32>() {
                Ok(index) => {
                    let index = syn::Index {
                        index,
                        span: field_span,
                    };
                    quote!(.#index)
                }
                Err(_) => {
                    let field = Ident::new(f, field_span);
                    quote!(.#field)
                }
            })
            .collect()
    };
    key.parts
        .iter()
        .map(|part| {
            // Spanned at the parameter so that a missing `KeyPart` impl is
            // reported where the user can fix it.
            let (span, value) = match part {
                Part::Literal(text) => return quote!(#builder.literal(#text);),
                Part::SelfField(path) => {
                    let span = key.literal.span();
                    let fields = fields(path);
                    (span, quote_spanned!(span=> &self #(#fields)*))
                }
                Part::Param(param, path) => {
                    let span = param.arg.span();
                    let ident = Ident::new(&param.ident.to_string(), span);
                    let already_a_reference =
                        params == ParamsAre::Borrowed || is_shared_reference(param.ty);
                    let value = if path.is_empty() && already_a_reference {
                        quote!(#ident)
                    } else {
                        let fields = fields(path);
                        quote_spanned!(span=> &#ident #(#fields)*)
                    };
                    (span, value)
                }
            };
            quote_spanned!(span=> #krate::__private::KeyBuilder::part(&mut #builder, #value);)
        })
        .collect()
}

fn is_shared_reference(ty: &Type) -> bool {
    matches!(ty, Type::Reference(r) if r.mutability.is_none())
}

fn shape_ident(shape: Shape) -> Ident {
    let name = match shape {
        Shape::Result => "ResultShape",
        Shape::Option => "OptionShape",
        Shape::ResultOption => "ResultOptionShape",
        Shape::Plain => "PlainShape",
    };
    Ident::new(name, Span::call_site())
}

fn ret_span(func: &AnnotatedFn) -> Span {
    func.output
        .ty
        .map_or_else(|| func.item.sig.fn_token.span(), |ty| ty.span())
}

fn wrapper(plan: &Plan) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let key_fn = key_fn_name(func.name());
    let key = Ident::new("key", Span::mixed_site());
    let cache = Ident::new("cache", Span::mixed_site());

    let self_arg = plan
        .key_fn
        .uses_self
        .then(|| match func.receiver.map(|r| &r.kind) {
            Some(ReceiverKind::Reference(..)) => quote!(self,),
            _ => quote!(&self,),
        });
    let batch_ident = plan.batch.map(|b| b.param.ident);
    let args = plan.key_fn.params.iter().map(|p| {
        let ident = p.ident;
        if batch_ident == Some(ident) {
            // The key closure's `&T`.
            if is_shared_reference(p.ty) {
                quote!(*#ident)
            } else {
                quote!(#ident)
            }
        } else if is_shared_reference(p.ty) {
            quote!(#ident)
        } else {
            quote!(&#ident)
        }
    });
    let key_call = if func.receiver.is_some() {
        quote!(Self::#key_fn(#self_arg #(#args),*))
    } else {
        quote!(#key_fn(#(#args),*))
    };
    let cache_arg = cache_binding(&cache, plan.cache, krate);
    let shape = shape_ident(func.output.shape);
    if let Some(batch) = &plan.batch {
        return batch_wrapper(plan, batch, &key_call, &cache_arg, &shape);
    }
    // With a local tier, the value must be `Clone`: the entry point's
    // bound says so at the return type.
    let entry = match (plan.detached, plan.local_millis.is_some()) {
        (false, false) => quote!(cached),
        (false, true) => quote!(cached_local),
        (true, false) => quote!(cached_detached),
        (true, true) => quote!(cached_detached_local),
    };
    let call = body_call_with(
        func,
        quote!(#krate::__private::#entry::<#krate::__private::#shape, _, _, _>),
        quote!(#cache, #key,),
        TokenStream::new(),
        TokenStream::new(),
        rules_arg(plan),
    );
    let checks = value_checks(plan, &shape, "ValueOf");
    wrap_as(
        func,
        &func.item.sig,
        checks,
        quote! {
            let #key = #key_call;
            #cache_arg
        },
        call,
    )
}

/// The runtime call's last argument: what the value decides about its
/// entry (`tags_from`, `ttl_from`, `unless`), each user function called at
/// the user's path so that one of the wrong signature is reported there.
fn rules_arg(plan: &Plan) -> TokenStream {
    let rules = rules(plan);
    quote!(, #rules)
}

/// A `ByValue` of the function's `tags_from`, `ttl_from` and `unless`.
fn rules(plan: &Plan) -> TokenStream {
    let krate = &plan.krate;
    // At the return type, as the runtime call is: an unmet bound of the
    // value is reported once there, not again here.
    let mut rules = respan(
        quote!(#krate::__private::ByValue::new()),
        ret_span(&plan.func),
    );
    // Located at the path, so that a value of the wrong type is reported
    // there rather than at the whole attribute. The closures around the
    // calls are the macro's (a lint about them is not the user's).
    let value = |path: &syn::Path| Ident::new("value", Span::mixed_site().located_at(path.span()));
    if let Some(path) = plan.tags_from {
        let value = value(path);
        let tags = Ident::new("tags", Span::mixed_site());
        rules = quote_spanned! {path.span()=>
            #rules.tags_from(|#value, #tags| ::core::iter::Extend::extend(#tags, #path(#value)))
        };
    }
    if let Some(path) = plan.ttl_from {
        let value = value(path);
        let ttl = quote_spanned!(path.span()=> #path(#value));
        rules = quote!(#rules.ttl_from(|#value| #ttl));
    }
    if let Some(path) = plan.unless {
        let value = value(path);
        let unless = quote_spanned!(path.span()=> #path(#value));
        rules = quote!(#rules.unless(|#value| #unless));
    }
    rules
}

/// `<V as Cacheable>::CACHEABLE` (and, with a local tier, `V::clone`),
/// spanned at the return type, where `V` is the cached value (`ValueOf`,
/// or `BatchValueOf` for a batch): a value that is not
/// `Serialize + DeserializeOwned` (or not `Clone`) is reported there, with
/// `Cacheable`'s message, and the runtime call's own bounds on the same span
/// add nothing (rustc reports an unmet trait once per span).
fn value_checks(plan: &Plan, shape: &Ident, value_of: &str) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let Some(ret_ty) = func.output.ty.filter(|_| !func.output.impl_trait) else {
        return TokenStream::new();
    };
    let span = ret_span(func);
    let value_of = Ident::new(value_of, span);
    let value = quote_spanned!(span=> <#krate::__private::#shape as #krate::__private::#value_of<#ret_ty>>::Value);
    let clone = plan
        .local_millis
        .is_some()
        .then(|| quote_spanned!(span=> let _ = <#value as ::core::clone::Clone>::clone;));
    quote_spanned! {span=>
        let () = <#value as #krate::Cacheable>::CACHEABLE;
        #clone
    }
}

/// A batch function: the keys of every id, then the body as a closure of
/// the missing ids, rebound to the batch parameter's name and type.
fn batch_wrapper(
    plan: &Plan,
    batch: &Batch,
    key_call: &TokenStream,
    cache_arg: &TokenStream,
    shape: &Ident,
) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let keys = Ident::new("keys", Span::mixed_site());
    let cache = Ident::new("cache", Span::mixed_site());
    let missing = Ident::new("missing", Span::mixed_site());
    let owned = Ident::new("owned", Span::mixed_site());
    let ids = batch.param.ident;
    let element = batch.element;
    let pat = &batch.param.arg.pat;
    let collect = quote! {
        ::core::iter::Iterator::collect(::core::iter::IntoIterator::into_iter(#missing))
    };
    let rebind = match batch.param.ty {
        Type::Reference(r) => {
            let inner = &r.elem;
            match &**inner {
                Type::Slice(_) => quote!(let #pat: &#inner = &#missing;),
                _ => quote! {
                    let #owned: #inner = #collect;
                    let #pat: &#inner = &#owned;
                },
            }
        }
        Type::ImplTrait(_) => quote!(let #pat = #missing;),
        ty => quote!(let #pat: #ty = #collect;),
    };
    let entry = if plan.local_millis.is_some() {
        quote!(cached_batch_local)
    } else {
        quote!(cached_batch)
    };
    let call = body_call_with(
        func,
        quote!(#krate::__private::#entry::<#krate::__private::#shape, _, _, _, _, _>),
        quote!(#cache, #keys,),
        quote!(move |#missing: ::std::vec::Vec<#element>|),
        rebind,
        rules_arg(plan),
    );
    // The parameter is only handed to `batch_keys`: its `mut` belongs to
    // the rebinding in the body.
    let mut sig = func.item.sig.clone();
    for input in &mut sig.inputs {
        if let syn::FnArg::Typed(arg) = input
            && let syn::Pat::Ident(pat) = &mut *arg.pat
            && pat.ident == *ids
        {
            pat.mutability = None;
        }
    }
    let checks = value_checks(plan, shape, "BatchValueOf");
    wrap_as(
        func,
        &sig,
        checks,
        quote! {
            let #keys = #krate::__private::batch_keys::<#element, _, _, _>(
                #ids,
                |#ids: &#element| #key_call,
            );
            #cache_arg
        },
        call,
    )
}

/// `let cache = Some(&expr)` for `cache = expr`, else `None` (the installed one).
pub fn cache_binding(cache: &Ident, expr: Option<&Expr>, krate: &syn::Path) -> TokenStream {
    match expr {
        Some(expr) => {
            let borrowed = quote_spanned!(expr.span()=> &#expr);
            quote! {
                let #cache: &#krate::Cache = #borrowed;
                let #cache = ::core::option::Option::Some(#cache);
            }
        }
        None => quote!(let #cache = ::core::option::Option::None;),
    }
}

/// `callee(leading_args async move { body }).await`, the one runtime call a
/// wrapper makes. The call's own tokens (path, parentheses, `.await`) carry
/// the return type's span, so that a value that is not `Serialize` is
/// reported there; the body inside keeps the user's spans.
pub fn body_call(
    func: &AnnotatedFn,
    callee: TokenStream,
    leading_args: TokenStream,
) -> TokenStream {
    body_call_with(
        func,
        callee,
        leading_args,
        TokenStream::new(),
        TokenStream::new(),
        TokenStream::new(),
    )
}

/// [`body_call`], with the body given as `head async move { prologue body }`:
/// a batch's body is a closure of the missing ids.
fn body_call_with(
    func: &AnnotatedFn,
    callee: TokenStream,
    leading_args: TokenStream,
    head: TokenStream,
    prologue: TokenStream,
    trailing_args: TokenStream,
) -> TokenStream {
    let stmts = func.body();
    let ret_span = ret_span(func);
    let unit: Type = syn::parse_quote!(());
    let ret_ty = func.output.ty.unwrap_or(&unit);
    let fake_return_edge = if func.output.impl_trait {
        quote!()
    } else {
        // Pins the async block's output type to the declared return type, so
        // that `?` converts errors and a type error points at the signature.
        quote_spanned! {ret_span=>
            #[allow(unreachable_code, unused_variables, clippy::diverging_sub_expression, clippy::let_unit_value, clippy::empty_loop, clippy::needless_return)]
            if false {
                let fake_return_edge: #ret_ty = loop {};
                return fake_return_edge;
            }
        }
    };
    let callee = respan(callee, ret_span);
    let mut args = Group::new(
        Delimiter::Parenthesis,
        quote! {
            #leading_args #head async move {
                #prologue
                #fake_return_edge
                #(#stmts)*
            }
            #trailing_args
        },
    );
    args.set_span(ret_span);
    quote_spanned!(ret_span=> #callee #args .await)
}

/// The user's function with a new body: `prelude` (keys, cache), then
/// `call`. For `#[async_trait]`'s output, the call goes back into a boxed
/// `async move` block, last in the body, where `#[async_trait]` put it and
/// `#[tracing::instrument]` looks for it.
pub fn wrap(func: &AnnotatedFn, prelude: TokenStream, call: TokenStream) -> TokenStream {
    wrap_as(func, &func.item.sig, TokenStream::new(), prelude, call)
}

/// [`wrap`] with another signature, and `checks` (of the return type, see
/// [`value_checks`]) before the prelude. The checks are not renamed with
/// the prelude under `#[async_trait]`: they name the user's return type,
/// whose `self::` paths must stay as written.
fn wrap_as(
    func: &AnnotatedFn,
    sig: &syn::Signature,
    checks: TokenStream,
    prelude: TokenStream,
    call: TokenStream,
) -> TokenStream {
    let item = func.item;
    let attrs = &item.attrs;
    let vis = &item.vis;
    let body = match func.asyncness {
        // Inside `let __ret = { ... }`, after `#[async_trait]` rebound the
        // parameters (so that its rebindings are used) and `self` as
        // `__self`.
        Asyncness::AsyncTrait {
            block,
            ret_at: Some(at),
        } => {
            let prelude = if func.receiver.is_some() {
                rename_self(prelude)
            } else {
                prelude
            };
            let stmts = block.block.stmts.iter().enumerate().map(|(i, stmt)| {
                let syn::Stmt::Local(local) = stmt else {
                    return quote!(#stmt);
                };
                if i != at {
                    return quote!(#stmt);
                }
                let pat = &local.pat;
                quote!(let #pat = { #checks #prelude #call };)
            });
            quote!(::std::boxed::Box::pin(async move { #(#stmts)* }))
        }
        Asyncness::AsyncTrait { ret_at: None, .. } => {
            quote!(#checks #prelude ::std::boxed::Box::pin(async move { #call }))
        }
        Asyncness::Native | Asyncness::Not => quote!(#checks #prelude #call),
    };
    quote! {
        #(#attrs)*
        #vis #sig {
            #body
        }
    }
}

/// `self` → `__self`, as `#[async_trait]` renames it inside its block.
fn rename_self(tokens: TokenStream) -> TokenStream {
    tokens
        .into_iter()
        .map(|token| match token {
            TokenTree::Ident(ident) if ident == "self" => {
                TokenTree::Ident(Ident::new("__self", ident.span()))
            }
            TokenTree::Group(group) => {
                let mut renamed = Group::new(group.delimiter(), rename_self(group.stream()));
                renamed.set_span(group.span());
                TokenTree::Group(renamed)
            }
            other => other,
        })
        .collect()
}

/// Gives every token the same span, so that rustc reports an error about the
/// whole path there (a path of mixed spans is reported at the attribute).
pub fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|token| match token {
            TokenTree::Group(group) => {
                let mut respanned = Group::new(group.delimiter(), respan(group.stream(), span));
                respanned.set_span(span);
                TokenTree::Group(respanned)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
}

/// `#[invalidates]` / `#[cache_put]`: render the targets' keys, then hand the
/// body to the runtime, which updates the cache once the write succeeded.
pub fn expand_write(plan: &WritePlan) -> Expansion {
    Expansion {
        method: write_wrapper(plan),
        items: TokenStream::new(),
        errors: TokenStream::new(),
    }
}

fn write_wrapper(plan: &WritePlan) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let name = &plan.stats_name;
    let site = Ident::new("REDIS_CACHED_SITE", Span::mixed_site());
    let cache = Ident::new("cache", Span::mixed_site());
    let cache_arg = cache_binding(&cache, plan.cache, krate);
    let shape = shape_ident(func.output.shape);
    let site_decl = quote! {
        static #site: #krate::__private::Function = #krate::__private::Function::writer(
            ::core::concat!(::core::module_path!(), "::", #name),
        );
    };
    match plan.kind {
        WriteKind::Invalidates => {
            let keys_ident = Ident::new("keys", Span::mixed_site());
            let keys = plan.targets.iter().filter_map(|target| match target {
                PlannedTarget::Call(expr) => {
                    let call = key_fn_call(expr);
                    Some(quote!(#call.untyped()))
                }
                PlannedTarget::AfterCall(..) => None,
                PlannedTarget::Template(key) => Some(template_key(key, krate, false)),
                PlannedTarget::Tag(tag) => Some(template_key(tag, krate, true)),
            });
            // Targets naming the result: rendered by a closure of it, after
            // the body (`ret` as the user wrote it, so that it resolves to
            // the closure's parameter).
            let after: Vec<TokenStream> = plan
                .targets
                .iter()
                .filter_map(|target| match target {
                    PlannedTarget::AfterCall(expr, _) => {
                        let call = key_fn_call(expr);
                        Some(quote!(#call.untyped()))
                    }
                    _ => None,
                })
                .collect();
            let call = if after.is_empty() {
                body_call(
                    func,
                    quote!(#krate::__private::invalidating::<#krate::__private::#shape, _, _, _>),
                    quote!(#cache, &#site, #keys_ident,),
                )
            } else {
                // The user's own `ret` (its span, so its hygiene), which
                // the targets' arguments name.
                let ret = plan
                    .targets
                    .iter()
                    .find_map(|target| match target {
                        PlannedTarget::AfterCall(_, ret) => Some((*ret).clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| Ident::new("ret", Span::call_site()));
                body_call_with(
                    func,
                    quote!(#krate::__private::invalidating_after::<#krate::__private::#shape, _, _, _, _, _>),
                    quote!(#cache, &#site, #keys_ident,),
                    TokenStream::new(),
                    TokenStream::new(),
                    quote!(, |#ret| [#(#after),*]),
                )
            };
            wrap(
                func,
                quote! {
                    #site_decl
                    let #keys_ident = [#(#keys),*];
                    #cache_arg
                },
                call,
            )
        }
        WriteKind::CachePut | WriteKind::WriteBehind => {
            let Some(PlannedTarget::Call(target)) = plan.targets.first() else {
                return quote!();
            };
            // Located at the target: rustc reports a value type that differs
            // from the target's (`expected CacheKey<Admin>, found
            // CacheKey<User>`) where the user named the target.
            let key = Ident::new("key", target.span().resolved_at(Span::mixed_site()));
            let key_call = key_fn_call(target);
            let unit: Type = syn::parse_quote!(());
            let ret_ty = func.output.ty.unwrap_or(&unit);
            let key_call = if func.output.impl_trait {
                key_call
            } else {
                let check = respan(
                    quote!(#krate::__private::put_key::<#krate::__private::#shape, #ret_ty>),
                    target.span(),
                );
                quote_spanned!(target.span()=> #check(#key_call))
            };
            let call = match (plan.kind, plan.queue) {
                (WriteKind::WriteBehind, Some(queue)) => {
                    // At the user's queue: a queue of another value type is
                    // reported there (`expected &WriteQueue<User>`).
                    let queue = quote_spanned!(queue.span()=> &(#queue));
                    body_call(
                        func,
                        quote!(#krate::__private::write_behind::<#krate::__private::#shape, _, _>),
                        quote!(#cache, &#site, #key, #queue,),
                    )
                }
                _ => body_call(
                    func,
                    quote!(#krate::__private::put::<#krate::__private::#shape, _, _>),
                    quote!(#cache, &#site, #key,),
                ),
            };
            wrap(
                func,
                quote! {
                    #site_decl
                    let #key = #key_call;
                    #cache_arg
                },
                call,
            )
        }
    }
}

/// `get_user(id)` → `get_user_cache_key(&(id))`, `self.org(o.id)` →
/// `self.org_cache_key(&(o.id))`: each argument borrowed and spanned at the
/// user's expression, so that rustc reports a wrong type there.
fn key_fn_call(target: &Expr) -> TokenStream {
    let borrowed = |args: &syn::punctuated::Punctuated<Expr, syn::Token![,]>| {
        let args = args.iter().map(|arg| quote_spanned!(arg.span()=> &(#arg)));
        quote!(#(#args),*)
    };
    match target {
        Expr::Call(call) => {
            let Expr::Path(path) = &*call.func else {
                return quote!(#call);
            };
            let mut path = path.clone();
            if let Some(last) = path.path.segments.last_mut() {
                last.ident = generated_name(&last.ident);
            }
            let mut args = Group::new(Delimiter::Parenthesis, borrowed(&call.args));
            args.set_span(call.paren_token.span.join());
            quote!(#path #args)
        }
        Expr::MethodCall(call) => {
            let receiver = &call.receiver;
            let dot = &call.dot_token;
            let method = generated_name(&call.method);
            let turbofish = &call.turbofish;
            let mut args = Group::new(Delimiter::Parenthesis, borrowed(&call.args));
            args.set_span(call.paren_token.span.join());
            quote!(#receiver #dot #method #turbofish #args)
        }
        other => quote!(#other),
    }
}

/// `get_user` → `get_user_cache_key`, at the user's name: a typo is reported
/// there as `cannot find function get_usr_cache_key`.
fn generated_name(target: &Ident) -> Ident {
    Ident::new(&key_fn_name(target).to_string(), target.span())
}

/// `#[invalidates(key = "...")]`: the key rendered from the writer's own
/// parameters, as an untyped `CacheKey`.
fn template_key(key: &Key, krate: &syn::Path, tag: bool) -> TokenStream {
    let builder = Ident::new("key", Span::mixed_site());
    let capacity = key.capacity;
    let steps = key_steps(key, krate, &builder, ParamsAre::Owned);
    let new = if tag {
        quote!(#krate::__private::KeyBuilder::new_tag(#capacity))
    } else {
        quote!(#krate::__private::KeyBuilder::new(#capacity, ::core::option::Option::None))
    };
    quote! {{
        let mut #builder = #new;
        #(#steps)*
        #builder.finish::<#krate::Untyped>(::core::option::Option::None)
    }}
}
