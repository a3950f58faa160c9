//! Code generation. Glue only: build the key with the runtime's
//! `KeyBuilder`, then hand the body to one runtime function.

use std::collections::BTreeSet;

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{GenericParam, Generics, Ident, ItemFn, ReceiverKind, Type, WherePredicate};

use crate::ast::{Param, Shape};
use crate::template::Segment;
use crate::valid::Plan;

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
    let params = plan
        .key_params
        .iter()
        .map(|Param { ident, ty, .. }| match ty {
            // `&impl A + B` would be ambiguous.
            Type::ImplTrait(_) | Type::TraitObject(_) => quote!(#ident: &(#ty)),
            _ => quote!(#ident: &#ty),
        });
    let key_types: Vec<&Type> = plan.key_params.iter().map(|p| p.ty).collect();
    let generics = generics_used_by(&func.item.sig.generics, &key_types);
    let (impl_generics, _, where_clause) = generics.split_for_impl();

    let builder = Ident::new("key", Span::mixed_site());
    let capacity = plan.template.literal_len() + 8 * plan.key_params.len() + 4;
    let steps = plan.template.segments.iter().map(|segment| match segment {
        Segment::Literal(text) => quote!(#builder.literal(#text);),
        Segment::Placeholder(p) => {
            // Spanned at the parameter so that a missing `KeyPart` impl is
            // reported where the user can fix it.
            let span = if p.root == "self" {
                plan.key.span()
            } else {
                func.param(&p.root)
                    .map_or_else(|| plan.key.span(), |param| param.arg.span())
            };
            let root = if p.root == "self" {
                quote_spanned!(span=> self)
            } else {
                let ident = Ident::new(&p.root, span);
                quote!(#ident)
            };
            // Located at the key, where the field is named, but marked as
            // macro output so that rustc does not suggest renaming the parameter.
            let field_span = plan.key.span().resolved_at(Span::mixed_site());
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
            let value = if p.fields.is_empty() && p.root != "self" {
                quote!(#root)
            } else {
                quote_spanned!(span=> &#root #(#fields)*)
            };
            quote_spanned!(span=> #krate::__private::KeyBuilder::part(&mut #builder, #value);)
        }
    });
    let version = match plan.version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    quote! {
        #[doc = #doc]
        #[must_use]
        #[allow(clippy::trivially_copy_pass_by_ref, clippy::ref_option_ref)]
        #vis fn #name #impl_generics (#receiver #(#params),*) -> #krate::CacheKey #where_clause {
            let mut #builder = #krate::__private::KeyBuilder::new(#capacity);
            #(#steps)*
            #builder.finish(#version)
        }
    }
}

fn wrapper(plan: &Plan) -> TokenStream {
    let func = &plan.func;
    let krate = &plan.krate;
    let item = func.item;
    let attrs = &item.attrs;
    let vis = &item.vis;
    let sig = &item.sig;
    let stmts = &item.block.stmts;
    let name = func.name().to_string();
    let key_fn = key_fn_name(func.name());

    let site = Ident::new("REDIS_CACHED_SITE", Span::mixed_site());
    let key = Ident::new("key", Span::mixed_site());
    let cache = Ident::new("cache", Span::mixed_site());

    let self_arg = plan
        .uses_self
        .then(|| match func.receiver.map(|r| &r.kind) {
            Some(ReceiverKind::Reference(..)) => quote!(self,),
            _ => quote!(&self,),
        });
    let args = plan.key_params.iter().map(|p| p.ident);
    let key_call = if func.receiver.is_some() {
        quote!(Self::#key_fn(#self_arg #(&#args),*))
    } else {
        quote!(#key_fn(#(&#args),*))
    };

    let cache_arg = match plan.cache {
        Some(expr) => {
            let borrowed = quote_spanned!(expr.span()=> &#expr);
            quote! {
                let #cache: &#krate::Cache = #borrowed;
                let #cache = ::core::option::Option::Some(#cache);
            }
        }
        None => quote!(let #cache = ::core::option::Option::None;),
    };

    let ret_span = func
        .output
        .ty
        .map_or_else(|| sig.fn_token.span(), |ty| ty.span());
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
    let shape = match func.output.shape {
        Shape::Result => quote!(ResultShape),
        Shape::Option => quote!(OptionShape),
        Shape::ResultOption => quote!(ResultOptionShape),
        Shape::Plain => quote!(PlainShape),
    };
    // Spanned at the return type: a value that is not `Serialize +
    // DeserializeOwned` is reported there.
    let cached = respan(
        quote!(#krate::__private::cached::<#krate::__private::#shape, _, _>),
        ret_span,
    );
    let ttl = plan.ttl_millis;
    let jitter = plan.jitter;
    // The call's own tokens (path, parentheses, `.await`) all carry the return
    // type's span; the body inside keeps the user's spans.
    let mut args = Group::new(
        Delimiter::Parenthesis,
        quote! {
            #cache, &#site, #key, async move {
                #fake_return_edge
                #(#stmts)*
            }
        },
    );
    args.set_span(ret_span);
    let call = quote_spanned!(ret_span=> #cached #args .await);

    quote! {
        #(#attrs)*
        #vis #sig {
            static #site: #krate::__private::Site = #krate::__private::Site::new(
                ::core::concat!(::core::module_path!(), "::", #name),
                #ttl,
                #jitter,
            );
            let #key = #key_call;
            #cache_arg
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
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
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
