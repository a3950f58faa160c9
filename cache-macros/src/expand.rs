//! Code generation. Glue only: build the key with the runtime's
//! `KeyBuilder`, then hand the body to one runtime function.

use std::collections::BTreeSet;

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{
    Expr, GenericParam, Generics, Ident, ItemFn, LitStr, ReceiverKind, Type, WherePredicate,
};

use crate::args::{SingleFlight, WriteKind};
use crate::ast::{AnnotatedFn, Param, Shape};
use crate::template::{Segment, Template};
use crate::valid::{Plan, PlannedTarget, WritePlan};

/// The name of the generated key function: `get_user` → `get_user_cache_key`.
pub fn key_fn_name(name: &Ident) -> Ident {
    format_ident!("{}_cache_key", name)
}

pub fn expand(plan: &Plan) -> TokenStream {
    let key_fn = key_fn(plan);
    let wrapper = wrapper(plan);
    quote! {
        #key_fn
        #wrapper
    }
}

/// On error: the user's function unchanged plus the errors, so that callers
/// of the function see no follow-on errors.
pub fn fallback(item: &ItemFn, errors: syn::Error) -> TokenStream {
    let errors = errors.into_compile_error();
    quote! {
        #item
        #errors
    }
}

fn key_fn(plan: &Plan) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let vis = &func.item.vis;
    let name = key_fn_name(func.name());
    let doc = format!(
        " The cache key of `{}` for these arguments, as `#[redis_cached(key = {:?})]` renders it.",
        func.name(),
        plan.key.value()
    );
    let receiver = plan.uses_self.then(|| quote!(&self,));
    let params = plan.key_params.iter().map(|Param { ident, ty, .. }| {
        let ty = key_param_type(ty);
        quote!(#ident: #ty)
    });
    let key_types: Vec<&Type> = plan.key_params.iter().map(|p| p.ty).collect();
    let generics = generics_used_by(&func.item.sig.generics, &key_types);
    let (impl_generics, _, where_clause) = generics.split_for_impl();
    let value = cached_value_type(plan, &generics);

    let site = Ident::new("REDIS_CACHED_SITE", Span::mixed_site());
    let builder = Ident::new("key", Span::mixed_site());
    let capacity = plan.template.literal_len() + 8 * plan.key_params.len() + 4;
    let steps = key_steps(
        &plan.template,
        func,
        plan.key,
        krate,
        &builder,
        ParamsAre::Borrowed,
    );
    let version = match plan.version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    let fn_name = func.name().to_string();
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
    quote! {
        #[doc = #doc]
        #[must_use]
        #[allow(clippy::trivially_copy_pass_by_ref, clippy::ref_option_ref)]
        #vis fn #name #impl_generics (#receiver #(#params),*) -> #krate::CacheKey<#value> #where_clause {
            // The function's static configuration travels with its keys, so
            // that `#[cache_put]` stores with this function's TTL.
            static #site: #krate::__private::Site = #krate::__private::Site::new(
                ::core::concat!(::core::module_path!(), "::", #fn_name),
                #ttl,
                #jitter,
            )#single_flight #stale #early_refresh;
            let mut #builder = #krate::__private::KeyBuilder::new(
                #capacity,
                ::core::option::Option::Some(&#site),
            );
            #(#steps)*
            #builder.finish(#version)
        }
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
/// the return type, or `Untyped` when the key function cannot name it (the
/// return type mentions a generic parameter the key does not use, an elided
/// lifetime, or `impl Trait`).
fn cached_value_type(plan: &Plan, kept: &Generics) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let unit: Type = syn::parse_quote!(());
    let ret_ty = func.output.ty.unwrap_or(&unit);
    let declared: BTreeSet<String> = func
        .item
        .sig
        .generics
        .params
        .iter()
        .map(param_name)
        .collect();
    let kept: BTreeSet<String> = kept.params.iter().map(param_name).collect();
    let nameable = !contains_impl_trait(ret_ty)
        && !has_elided_lifetime(ret_ty)
        && mentioned_names(|c| c.visit_type(ret_ty))
            .iter()
            .all(|n| !declared.contains(n) || kept.contains(n));
    if !nameable {
        return quote!(#krate::Untyped);
    }
    let shape = shape_ident(func.output.shape);
    // At the return type, like the other uses of the value type.
    let span = ret_span(func);
    respan(
        quote!(<#krate::__private::#shape as #krate::__private::ValueOf<#ret_ty>>::Value),
        span,
    )
}

/// How the key steps refer to a parameter: inside the key function, where
/// every key parameter already is a reference, or in the writer's own body.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParamsAre {
    Borrowed,
    Owned,
}

/// The `KeyBuilder` calls that render `template` into `builder`.
pub fn key_steps(
    template: &Template,
    func: &AnnotatedFn,
    key: &LitStr,
    krate: &syn::Path,
    builder: &Ident,
    params: ParamsAre,
) -> Vec<TokenStream> {
    template
        .segments
        .iter()
        .map(|segment| match segment {
            Segment::Literal(text) => quote!(#builder.literal(#text);),
            Segment::Placeholder(p) => {
                // Spanned at the parameter so that a missing `KeyPart` impl is
                // reported where the user can fix it.
                let param = func.param(&p.root);
                let span = if p.root == "self" {
                    key.span()
                } else {
                    param.map_or_else(|| key.span(), |param| param.arg.span())
                };
                let root = if p.root == "self" {
                    quote_spanned!(span=> self)
                } else {
                    let ident = Ident::new(&p.root, span);
                    quote!(#ident)
                };
                // Located at the key, where the field is named, but marked as
                // macro output so that rustc does not suggest renaming the parameter.
                let field_span = key.span().resolved_at(Span::mixed_site());
                let fields = p.fields.iter().map(|f| match f.parse::<u32>() {
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
                });
                let already_a_reference = params == ParamsAre::Borrowed
                    || param.is_some_and(|param| is_shared_reference(param.ty));
                let value = if p.fields.is_empty() && p.root != "self" && already_a_reference {
                    quote!(#root)
                } else {
                    quote_spanned!(span=> &#root #(#fields)*)
                };
                quote_spanned!(span=> #krate::__private::KeyBuilder::part(&mut #builder, #value);)
            }
        })
        .collect()
}

fn is_shared_reference(ty: &Type) -> bool {
    matches!(ty, Type::Reference(r) if r.mutability.is_none())
}

fn has_elided_lifetime(ty: &Type) -> bool {
    struct Finder(bool);
    impl<'ast> Visit<'ast> for Finder {
        fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
            if r.lifetime.is_none() {
                self.0 = true;
            }
            syn::visit::visit_type_reference(self, r);
        }
        fn visit_lifetime(&mut self, lifetime: &'ast syn::Lifetime) {
            if lifetime.ident == "_" {
                self.0 = true;
            }
        }
    }
    let mut finder = Finder(false);
    finder.visit_type(ty);
    finder.0
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
        .uses_self
        .then(|| match func.receiver.map(|r| &r.kind) {
            Some(ReceiverKind::Reference(..)) => quote!(self,),
            _ => quote!(&self,),
        });
    let args = plan.key_params.iter().map(|p| {
        let ident = p.ident;
        if is_shared_reference(p.ty) {
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
    let call = body_call(
        func,
        quote!(#krate::__private::cached::<#krate::__private::#shape, _, _, _>),
        quote!(#cache, #key,),
    );
    wrap(
        func,
        quote! {
            let #key = #key_call;
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
    let stmts = &func.item.block.stmts;
    let ret_span = ret_span(func);
    let unit: Type = syn::parse_quote!(());
    let ret_ty = func.output.ty.unwrap_or(&unit);
    let fake_return_edge = if contains_impl_trait(ret_ty) {
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
            #leading_args async move {
                #fake_return_edge
                #(#stmts)*
            }
        },
    );
    args.set_span(ret_span);
    quote_spanned!(ret_span=> #callee #args .await)
}

/// The user's function with a new body: `prelude` (keys, cache), then `call`.
pub fn wrap(func: &AnnotatedFn, prelude: TokenStream, call: TokenStream) -> TokenStream {
    let item = func.item;
    let attrs = &item.attrs;
    let vis = &item.vis;
    let sig = &item.sig;
    quote! {
        #(#attrs)*
        #vis #sig {
            #prelude
            #call
        }
    }
}

fn contains_impl_trait(ty: &Type) -> bool {
    struct Finder(bool);
    impl<'ast> Visit<'ast> for Finder {
        fn visit_type_impl_trait(&mut self, _: &'ast syn::TypeImplTrait) {
            self.0 = true;
        }
    }
    let mut finder = Finder(false);
    finder.visit_type(ty);
    finder.0
}

/// Names (type, lifetime and const parameter names) that appear in some tokens.
fn mentioned_names(visit: impl FnOnce(&mut NameCollector)) -> BTreeSet<String> {
    let mut collector = NameCollector::default();
    visit(&mut collector);
    collector.0
}

#[derive(Default)]
struct NameCollector(BTreeSet<String>);

impl<'ast> Visit<'ast> for NameCollector {
    fn visit_ident(&mut self, ident: &'ast Ident) {
        self.0.insert(ident.to_string());
    }
    fn visit_lifetime(&mut self, lifetime: &'ast syn::Lifetime) {
        self.0.insert(format!("'{}", lifetime.ident));
    }
}

fn param_name(param: &GenericParam) -> String {
    match param {
        GenericParam::Lifetime(l) => format!("'{}", l.lifetime.ident),
        GenericParam::Type(t) => t.ident.to_string(),
        GenericParam::Const(c) => c.ident.to_string(),
    }
}

/// The generics of the cached function restricted to the parameters that the
/// key's types mention: a key function must not have a type parameter that
/// its caller cannot infer (one used only by a skipped parameter).
fn generics_used_by(generics: &Generics, types: &[&Type]) -> Generics {
    let mut used = mentioned_names(|c| types.iter().for_each(|ty| c.visit_type(ty)));
    // A kept parameter's bounds may mention further parameters (`T: Into<U>`).
    loop {
        let before = used.len();
        for param in &generics.params {
            if used.contains(&param_name(param)) {
                used.extend(mentioned_names(|c| c.visit_generic_param(param)));
            }
        }
        if let Some(where_clause) = &generics.where_clause {
            for predicate in &where_clause.predicates {
                if let WherePredicate::Type(p) = predicate
                    && mentioned_names(|c| c.visit_type(&p.bounded_ty))
                        .iter()
                        .any(|n| used.contains(n))
                {
                    used.extend(mentioned_names(|c| c.visit_where_predicate(predicate)));
                }
            }
        }
        if used.len() == before {
            break;
        }
    }
    let declared: BTreeSet<String> = generics.params.iter().map(param_name).collect();
    let mut kept = generics.clone();
    kept.params = generics
        .params
        .iter()
        .filter(|p| used.contains(&param_name(p)))
        .cloned()
        .collect();
    if let Some(where_clause) = &mut kept.where_clause {
        where_clause.predicates = where_clause
            .predicates
            .iter()
            .filter(|predicate| {
                mentioned_names(|c| c.visit_where_predicate(predicate))
                    .iter()
                    .all(|n| !declared.contains(n) || used.contains(n))
            })
            .cloned()
            .collect();
    }
    if kept.params.is_empty() {
        kept.lt_token = None;
        kept.gt_token = None;
    }
    kept
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
pub fn expand_write(plan: &WritePlan) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let name = func.name().to_string();
    let site = Ident::new("REDIS_CACHED_SITE", Span::mixed_site());
    let cache = Ident::new("cache", Span::mixed_site());
    let cache_arg = cache_binding(&cache, plan.cache, krate);
    let shape = shape_ident(func.output.shape);
    let site_decl = quote! {
        static #site: #krate::__private::Function = #krate::__private::Function::new(
            ::core::concat!(::core::module_path!(), "::", #name),
        );
    };
    match plan.kind {
        WriteKind::Invalidates => {
            let keys_ident = Ident::new("keys", Span::mixed_site());
            let keys = plan.targets.iter().map(|target| match target {
                PlannedTarget::Call(expr) => {
                    let call = key_fn_call(expr);
                    quote!(#call.untyped())
                }
                PlannedTarget::Template { template, key } => {
                    template_key(func, template, key, krate)
                }
            });
            let call = body_call(
                func,
                quote!(#krate::__private::invalidating::<#krate::__private::#shape, _, _, _>),
                quote!(#cache, &#site, #keys_ident,),
            );
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
        WriteKind::CachePut => {
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
            let key_call = if contains_impl_trait(ret_ty) {
                key_call
            } else {
                let check = respan(
                    quote!(#krate::__private::put_key::<#krate::__private::#shape, #ret_ty>),
                    target.span(),
                );
                quote_spanned!(target.span()=> #check(#key_call))
            };
            let call = body_call(
                func,
                quote!(#krate::__private::put::<#krate::__private::#shape, _, _>),
                quote!(#cache, &#site, #key,),
            );
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
fn template_key(
    func: &AnnotatedFn,
    template: &Template,
    key: &LitStr,
    krate: &syn::Path,
) -> TokenStream {
    let builder = Ident::new("key", Span::mixed_site());
    let capacity = template.literal_len() + 8 * template.placeholders().count() + 4;
    let steps = key_steps(template, func, key, krate, &builder, ParamsAre::Owned);
    quote! {{
        let mut #builder = #krate::__private::KeyBuilder::new(#capacity, ::core::option::Option::None);
        #(#steps)*
        #builder.finish::<#krate::Untyped>(::core::option::Option::None)
    }}
}
