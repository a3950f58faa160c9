//! Procedural macros of [`cache-runtime`](https://docs.rs/cache-runtime).
//! Depend on `cache-runtime`, which re-exports them; the generated code calls
//! into it.
//!
//! The pipeline, one module each: `args` (attribute arguments) → `template`
//! (the key-template language, pure) → `ast` (the annotated fn as a typed
//! model) → `valid` (every cross-check, all errors collected) → `expand` (glue).

mod args;
mod ast;
mod ctxt;
mod expand;
mod template;
mod valid;

use proc_macro::TokenStream;

/// Caches an `async fn`'s result in Redis (cache-aside). See the
/// `cache-runtime` documentation for the arguments.
#[proc_macro_attribute]
pub fn redis_cached(args: TokenStream, input: TokenStream) -> TokenStream {
    redis_cached_impl(args.into(), input.into()).into()
}

fn redis_cached_impl(
    args: proc_macro2::TokenStream,
    input: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    let item: syn::ItemFn = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(_) => {
            let error = syn::Error::new(
                proc_macro2::Span::call_site(),
                "`#[redis_cached]` applies to an `async fn` with a body",
            );
            let error = error.into_compile_error();
            return quote::quote!(#input #error);
        }
    };
    let mut errors = ctxt::Errors::default();
    let args = args::Args::parse(args, &mut errors);
    let func = ast::CachedFn::from_item(&item, &mut errors);
    let plan = valid::validate(&args, func, &mut errors);
    match (errors.finish(), plan) {
        (Ok(()), Some(plan)) => expand::expand(&plan),
        (Err(errors), _) => expand::fallback(&item, errors),
        // Validation reports an error whenever it returns no plan; should that
        // ever break, say so rather than panic inside the compiler.
        (Ok(()), None) => expand::fallback(
            &item,
            syn::Error::new(
                proc_macro2::Span::call_site(),
                "internal error in #[redis_cached]: please report it",
            ),
        ),
    }
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
