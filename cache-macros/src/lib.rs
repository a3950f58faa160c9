//! Procedural macros of [`cache-runtime`](https://docs.rs/cache-runtime).
//! Depend on `cache-runtime`, which re-exports them; the generated code calls
//! into it.
//!
//! The pipeline, one module each: `args` (attribute arguments) → `template`
//! (the key-template language, pure) → `ast` (the annotated fn as a typed
//! model) → `valid` (every cross-check, all errors collected, placeholders
//! resolved; `types` for the generics and types the key function can name)
//! → `expand` (glue). On error, `expand::fallback` emits the function
//! unchanged, a stub of its key function and the errors.

mod args;
mod ast;
mod ctxt;
mod expand;
mod impls;
mod template;
mod types;
mod valid;

use proc_macro::TokenStream;

/// Caches an `async fn`'s result in Redis (cache-aside). See the
/// `cache-runtime` documentation for the arguments.
#[proc_macro_attribute]
pub fn redis_cached(args: TokenStream, input: TokenStream) -> TokenStream {
    redis_cached_impl(args.into(), input.into()).into()
}

/// On an impl block, typically a trait impl (`impl UserRepo for Repo`):
/// expands the `#[redis_cached]`, `#[invalidates]` and `#[cache_put]`
/// methods inside it and puts their generated key functions in an inherent
/// impl of the type, since a trait impl cannot hold them. Above or below
/// `#[async_trait]`. See the `cache-runtime` documentation.
#[proc_macro_attribute]
pub fn cached_impl(args: TokenStream, input: TokenStream) -> TokenStream {
    impls::expand(args.into(), input.into()).into()
}

/// Deletes the cache entries of other functions once this write succeeded
/// (`Ok`, or any value that is not a `Result`). See the `cache-runtime`
/// documentation.
#[proc_macro_attribute]
pub fn invalidates(args: TokenStream, input: TokenStream) -> TokenStream {
    write_impl(args::WriteKind::Invalidates, args.into(), input.into()).into()
}

/// Stores this write's returned value as a cached function's entry
/// (write-through). See the `cache-runtime` documentation.
#[proc_macro_attribute]
pub fn cache_put(args: TokenStream, input: TokenStream) -> TokenStream {
    write_impl(args::WriteKind::CachePut, args.into(), input.into()).into()
}

/// Stores this write's returned value as a cached function's entry and
/// queues the change for a flusher to write to the database
/// (write-behind). See the `cache-runtime` documentation.
#[proc_macro_attribute]
pub fn write_behind(args: TokenStream, input: TokenStream) -> TokenStream {
    write_impl(args::WriteKind::WriteBehind, args.into(), input.into()).into()
}

fn redis_cached_impl(
    args: proc_macro2::TokenStream,
    input: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    match parse_fn(input, "redis_cached") {
        Ok(item) => redis_cached_parts(args, &item, valid::Context::default()).into_tokens(),
        Err(unchanged) => unchanged,
    }
}

/// `#[redis_cached]` on one fn, in parts; `context` says whether
/// `#[cached_impl]` moves the key function out.
fn redis_cached_parts(
    args: proc_macro2::TokenStream,
    item: &syn::ItemFn,
    context: valid::Context,
) -> expand::Expansion {
    let mut errors = ctxt::Errors::default();
    let args = args::Args::parse(args, &mut errors);
    let func = ast::AnnotatedFn::from_item(item);
    // `#[async_trait]`'s output is in a trait impl, where a stub key
    // function would be one more error.
    let stub_fits = !matches!(func.asyncness, ast::Asyncness::AsyncTrait { .. })
        || context.key_fn_moved.is_some();
    match (
        valid::validate(&args, func, context, &mut errors),
        errors.finish(),
    ) {
        (Ok(plan), Ok(())) => expand::expand(&plan),
        (Err(stub), result) if stub_fits => {
            expand::fallback(item, internal_or(result, "redis_cached"), Some(&stub))
        }
        (_, result) => expand::fallback(item, internal_or(result, "redis_cached"), None),
    }
}

fn write_impl(
    kind: args::WriteKind,
    args: proc_macro2::TokenStream,
    input: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    match parse_fn(input, kind.attribute()) {
        Ok(item) => write_parts(kind, args, item, None).into_tokens(),
        Err(unchanged) => unchanged,
    }
}

/// `#[invalidates]` or `#[cache_put]` on one fn, in parts; `owner` is the
/// impl's type under `#[cached_impl]`, for statistics.
fn write_parts(
    kind: args::WriteKind,
    args: proc_macro2::TokenStream,
    mut item: syn::ItemFn,
    owner: Option<&str>,
) -> expand::Expansion {
    let mut errors = ctxt::Errors::default();
    let mut write_args = args::WriteArgs::default();
    write_args.parse(kind, args, &mut errors);
    if kind == args::WriteKind::Invalidates {
        // A repeated `#[invalidates(...)]` joins this one: one wrapper, one
        // `DEL` of all the keys.
        let (siblings, others) = std::mem::take(&mut item.attrs)
            .into_iter()
            .partition(|attr| is_attribute(attr, "invalidates"));
        item.attrs = others;
        for sibling in siblings {
            match sibling.meta.require_list() {
                Ok(list) => write_args.parse(kind, list.tokens.clone(), &mut errors),
                Err(e) => errors.push(e),
            }
        }
    }
    let func = ast::AnnotatedFn::from_item(&item);
    let plan = valid::validate_write(kind, &write_args, func, owner, &mut errors);
    match (errors.finish(), plan) {
        (Ok(()), Some(plan)) => expand::expand_write(&plan),
        (result, _) => expand::fallback(&item, internal_or(result, kind.attribute()), None),
    }
}

/// The annotated fn, or the input unchanged plus an error.
fn parse_fn(
    input: proc_macro2::TokenStream,
    attribute: &str,
) -> Result<syn::ItemFn, proc_macro2::TokenStream> {
    syn::parse2(input.clone()).map_err(|_| {
        let error = syn::Error::new(
            proc_macro2::Span::call_site(),
            format!("`#[{attribute}]` applies to an `async fn` with a body"),
        )
        .into_compile_error();
        quote::quote!(#input #error)
    })
}

/// Validation reports an error whenever it returns no plan; should that ever
/// break, say so rather than panic inside the compiler.
fn internal_or(result: Result<(), syn::Error>, attribute: &str) -> syn::Error {
    result.err().unwrap_or_else(|| {
        syn::Error::new(
            proc_macro2::Span::call_site(),
            format!("internal error in #[{attribute}]: please report it"),
        )
    })
}

/// `#[name(...)]` or `#[path::to::name(...)]`.
fn is_attribute(attr: &syn::Attribute, name: &str) -> bool {
    attr.path().segments.last().is_some_and(|s| s.ident == name)
}

#[cfg(test)]
mod expansion_snapshots {
    use quote::quote;

    fn expand(args: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> String {
        let output = super::redis_cached_impl(args, item);
        let file: syn::File = syn::parse2(output).expect("the expansion parses as items");
        prettyplease::unparse(&file)
    }

    #[test]
    fn free_function_returning_result() {
        insta::assert_snapshot!(expand(
            quote!(key = "user:<id>", ttl = 60, skip(db)),
            quote! {
                pub async fn get_user(db: &Db, id: u64) -> Result<User, DbError> {
                    db.fetch_user(id).await
                }
            },
        ));
    }

    #[test]
    fn method_with_self_fields_cache_and_version() {
        insta::assert_snapshot!(expand(
            quote!(
                key = "tenant:<self.tenant>:org:<org.id>",
                ttl = "5m",
                jitter = 0.1,
                version = 2,
                cache = self.cache
            ),
            quote! {
                async fn org_members(&self, org: &Org) -> Option<Vec<User>> {
                    self.db.members(org.id).await
                }
            },
        ));
    }

    #[test]
    fn stampede_arguments_configure_the_site() {
        insta::assert_snapshot!(expand(
            quote!(
                key = "report:<id>",
                ttl = 60,
                single_flight = "distributed",
                stale = "30s",
                early_refresh = 1.5
            ),
            quote! {
                async fn report(id: u64) -> Report {
                    build_report(id).await
                }
            },
        ));
    }

    #[test]
    fn generic_function_keeps_only_the_generics_the_key_needs() {
        insta::assert_snapshot!(expand(
            quote!(key = "label:<id>", ttl = 60, skip(db)),
            quote! {
                async fn label<D: Db, K>(db: &D, id: K) -> String
                where
                    K: KeyPart + Display,
                    D: Sync,
                {
                    format!("{}:{id}", db.name())
                }
            },
        ));
    }

    fn expand_write(
        kind: crate::args::WriteKind,
        args: proc_macro2::TokenStream,
        item: proc_macro2::TokenStream,
    ) -> String {
        let output = super::write_impl(kind, args, item);
        let file: syn::File = syn::parse2(output).expect("the expansion parses as items");
        prettyplease::unparse(&file)
    }

    #[test]
    fn tags_are_rendered_by_the_key_function() {
        insta::assert_snapshot!(expand(
            quote!(
                key = "member:<org.id>:<user_id>",
                ttl = 60,
                tags = ["org:<org.id>", "members"]
            ),
            quote! {
                pub async fn member(org: &Org, user_id: u64) -> Result<Member, DbError> {
                    fetch(org, user_id).await
                }
            },
        ));
    }

    #[test]
    fn tags_from_the_value_are_listed_by_the_users_function() {
        insta::assert_snapshot!(expand(
            quote!(
                key = "category:<category>",
                ttl = 60,
                tags_from = product_tags
            ),
            quote! {
                pub async fn list_category(category: &str) -> Result<Vec<Product>, DbError> {
                    fetch(category).await
                }
            },
        ));
    }

    #[test]
    fn the_value_chooses_its_ttl_and_whether_it_is_stored() {
        insta::assert_snapshot!(expand(
            quote!(
                key = "order:<id>",
                ttl = 60,
                ttl_from = order_ttl,
                unless = is_draft,
                skip(db)
            ),
            quote! {
                pub async fn order(db: &Db, id: u64) -> Result<Order, DbError> {
                    db.order(id).await
                }
            },
        ));
    }

    #[test]
    fn invalidates_keys_made_from_the_result() {
        insta::assert_snapshot!(expand_write(
            crate::args::WriteKind::Invalidates,
            quote!(Self::get_product(id), Self::find_by_sku(&ret.sku)),
            quote! {
                async fn update_price(&self, id: u64, price: u64) -> Result<Product, DbError> {
                    self.db.update_price(id, price).await
                }
            },
        ));
    }

    #[test]
    fn fail_safe_with_a_soft_timeout_finishes_owned_bodies_in_the_background() {
        insta::assert_snapshot!(expand(
            quote!(
                key = "price:<sku>",
                ttl = 30,
                fail_safe = "1h",
                soft_timeout = "150ms",
                skip(db)
            ),
            quote! {
                pub async fn price(db: Arc<Db>, sku: String) -> Result<Price, DbError> {
                    db.price(&sku).await
                }
            },
        ));
    }

    #[test]
    fn invalidates_a_tag() {
        insta::assert_snapshot!(expand_write(
            crate::args::WriteKind::Invalidates,
            quote!(tag = "org:<org_id>"),
            quote! {
                pub async fn delete_org(org_id: u64) -> Result<(), DbError> {
                    delete(org_id).await
                }
            },
        ));
    }

    #[test]
    fn invalidates_with_two_targets_and_a_repeated_attribute() {
        insta::assert_snapshot!(expand_write(
            crate::args::WriteKind::Invalidates,
            quote!(
                Self::get_user(user.id),
                Self::by_email(&user.email),
                cache = self.cache
            ),
            quote! {
                #[invalidates(key = "user:<user.id>:friends", cache = self.cache)]
                pub async fn save(&self, user: User) -> Result<(), DbError> {
                    self.db.save(user).await
                }
            },
        ));
    }

    #[test]
    fn cache_put_checks_the_value_type_at_the_target() {
        insta::assert_snapshot!(expand_write(
            crate::args::WriteKind::CachePut,
            quote!(get_user(id)),
            quote! {
                async fn rename(db: &Db, id: u64, name: String) -> Result<User, DbError> {
                    db.rename(id, name).await
                }
            },
        ));
    }

    fn expand_impl(item: proc_macro2::TokenStream) -> String {
        let output = super::impls::expand(proc_macro2::TokenStream::new(), item);
        let file: syn::File = syn::parse2(output).expect("the expansion parses as items");
        prettyplease::unparse(&file)
    }

    #[test]
    fn cached_impl_moves_key_functions_out_of_a_trait_impl() {
        insta::assert_snapshot!(expand_impl(quote! {
            impl<D: Db> UserRepo for Repo<D> {
                #[redis_cached(key = "user:<id>", ttl = 60, cache_none, cache = self.cache)]
                async fn get_user(&self, id: u64) -> Result<Option<User>, DbError> {
                    self.db.user(id).await
                }
            }
        }));
    }

    #[test]
    fn cached_impl_below_async_trait_rewrites_its_boxed_future() {
        // What `#[async_trait]` (0.1.89) makes of `get_user` before
        // `#[cached_impl]` runs, when it is the outer attribute.
        insta::assert_snapshot!(expand_impl(quote! {
            impl UserRepo for Repo {
                #[redis_cached(key = "<self.tenant>:user:<id>", ttl = 60)]
                fn get_user<'life0, 'async_trait>(
                    &'life0 self,
                    id: u64,
                ) -> ::core::pin::Pin<Box<
                    dyn ::core::future::Future<Output = Result<User, DbError>>
                        + ::core::marker::Send + 'async_trait
                >>
                where
                    'life0: 'async_trait,
                    Self: 'async_trait,
                {
                    Box::pin(async move {
                        if let ::core::option::Option::Some(__ret) =
                            ::core::option::Option::None::<Result<User, DbError>> {
                            #[allow(unreachable_code)]
                            return __ret;
                        }
                        let __self = self;
                        let id = id;
                        let __ret: Result<User, DbError> = { __self.db.user(id).await };
                        #[allow(unreachable_code)]
                        __ret
                    })
                }
            }
        }));
    }

    #[test]
    fn errors_leave_the_function_unchanged() {
        insta::assert_snapshot!(expand(
            quote!(key = "user:<idd>", ttl = 0),
            quote! {
                async fn get_user(id: u64) -> u64 {
                    id
                }
            },
        ));
    }
}
