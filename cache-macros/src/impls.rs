//! `#[cached_impl]` on an impl block: expands the `#[redis_cached]`,
//! `#[invalidates]` and `#[cache_put]` methods inside it, and moves each
//! generated key function into an inherent impl of the same type. A trait
//! impl cannot hold items that the trait does not declare, so without this
//! the key function of a method in `impl UserRepo for Repo` has nowhere to
//! go; with it, `Self::get_user_cache_key` (and so
//! `#[invalidates(Self::get_user(id))]`) works in trait impls too.
//!
//! It runs before or after `#[async_trait]`, whichever is outer: the methods
//! are then `async fn`s, or `#[async_trait]`'s boxed futures, which `ast`
//! recognises.

use proc_macro2::TokenStream;
use quote::quote;
use syn::spanned::Spanned;
use syn::{Attribute, ImplItem, ImplItemFn, ItemFn, ItemImpl, Meta};

use crate::args::WriteKind;
use crate::expand::Expansion;
use crate::valid::Context;

/// One of this crate's method attributes.
enum Ours {
    RedisCached,
    Write(WriteKind),
}

fn ours(attr: &Attribute) -> Option<Ours> {
    let name = attr.path().segments.last()?.ident.to_string();
    match name.as_str() {
        "redis_cached" => Some(Ours::RedisCached),
        "invalidates" => Some(Ours::Write(WriteKind::Invalidates)),
        "cache_put" => Some(Ours::Write(WriteKind::CachePut)),
        "write_behind" => Some(Ours::Write(WriteKind::WriteBehind)),
        _ => None,
    }
}

pub fn expand(args: TokenStream, input: TokenStream) -> TokenStream {
    let mut item: ItemImpl = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(_) => {
            let error = syn::Error::new(
                proc_macro2::Span::call_site(),
                "`#[cached_impl]` applies to an impl block (`impl UserRepo for Repo { ... }`)\n\
                 help: on a single function, use `#[redis_cached(...)]` itself",
            )
            .into_compile_error();
            return quote!(#input #error);
        }
    };
    let mut errors = TokenStream::new();
    if !args.is_empty() {
        errors.extend(
            syn::Error::new(
                args.span(),
                "`#[cached_impl]` takes no arguments: configure each method's `#[redis_cached(...)]`",
            )
            .into_compile_error(),
        );
    }
    // In a trait impl, methods are as visible as the trait: so are their
    // key functions. Elsewhere the key function keeps its method's.
    let is_trait_impl = item.trait_.is_some();
    // Statistics name a method after its type (and trait), so that two
    // impls' methods of one name in one module are counted apart.
    let owner = match &item.trait_ {
        Some((trait_path, _)) => format!(
            "<{} as {}>",
            crate::types::text(&item.self_ty),
            crate::types::text(trait_path)
        ),
        None => crate::types::text(&item.self_ty),
    };
    let mut moved = Vec::new();
    // The attributes' paths as the user wrote them: named again below, so
    // that the user's `use cache_runtime::redis_cached` is not reported as
    // unused after this expansion consumed the attributes.
    let mut used_paths: Vec<syn::Path> = Vec::new();
    for impl_item in &mut item.items {
        let ImplItem::Fn(method) = impl_item else {
            continue;
        };
        // One attribute at a time, outermost first, as rustc would.
        while let Some(at) = method.attrs.iter().position(|a| ours(a).is_some()) {
            let attr = method.attrs.remove(at);
            let Some(kind) = ours(&attr) else { break };
            let path = attr.path();
            let written = quote!(#path).to_string();
            if !used_paths.iter().any(|p| quote!(#p).to_string() == written) {
                used_paths.push(path.clone());
            }
            let args = match &attr.meta {
                Meta::List(list) => list.tokens.clone(),
                Meta::Path(_) => TokenStream::new(),
                Meta::NameValue(value) => {
                    errors.extend(
                        syn::Error::new(value.span(), "expected `#[attribute(arguments)]`")
                            .into_compile_error(),
                    );
                    continue;
                }
            };
            let func = ItemFn {
                attrs: method.attrs.clone(),
                vis: method.vis.clone(),
                modifiers: method.modifiers.clone(),
                sig: method.sig.clone(),
                block: Box::new(method.block.clone()),
            };
            let key_vis = if is_trait_impl {
                syn::parse_quote!(pub)
            } else {
                method.vis.clone()
            };
            let Expansion {
                method: rewritten,
                items,
                errors: these,
            } = match kind {
                Ours::RedisCached => crate::redis_cached_parts(
                    args,
                    &func,
                    Context {
                        key_fn_moved: Some(key_vis),
                        owner: Some(owner.clone()),
                    },
                ),
                Ours::Write(kind) => crate::write_parts(kind, args, func, Some(&owner)),
            };
            moved.push(items);
            errors.extend(these);
            match syn::parse2::<ImplItemFn>(rewritten) {
                Ok(rewritten) => *method = rewritten,
                Err(error) => {
                    errors.extend(error.into_compile_error());
                    break;
                }
            }
        }
    }
    let inherent = (!moved.is_empty()).then(|| {
        let (impl_generics, _, where_clause) = item.generics.split_for_impl();
        let self_ty = &item.self_ty;
        quote! {
            #[automatically_derived]
            impl #impl_generics #self_ty #where_clause {
                #(#moved)*
            }
        }
    });
    let uses = used_paths.iter().map(|path| {
        quote! {
            #[allow(unused_imports)]
            const _: () = {
                use #path as _;
            };
        }
    });
    quote! {
        #item
        #inherent
        #(#uses)*
        #errors
    }
}
