//! Type analysis, kept out of `expand` (thiserror's `generics.rs`): which of
//! a function's generic parameters its key function needs, and whether the
//! key function can name the cached value type.

use std::collections::BTreeSet;

use syn::visit::Visit;
use syn::{GenericParam, Generics, Ident, Type, WherePredicate};

/// Whether a type mentions `impl Trait` anywhere.
pub fn contains_impl_trait(ty: &Type) -> bool {
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

/// `&T` → `T`, through parentheses and groups.
pub fn strip_reference(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Reference(r) => ty = &r.elem,
            Type::Paren(p) => ty = &p.elem,
            Type::Group(g) => ty = &g.elem,
            other => return other,
        }
    }
}

/// Collections whose first type argument is the element type.
const COLLECTIONS: &[&str] = &[
    "Vec",
    "VecDeque",
    "HashSet",
    "BTreeSet",
    "IndexSet",
    "SmallVec",
    "LinkedList",
];

/// The element type of a batch parameter: `&[T]`, `Vec<T>`, `&Vec<T>`,
/// `HashSet<T>`, ..., `impl IntoIterator<Item = T>`; `None` for anything
/// else.
pub fn element_type(ty: &Type) -> Option<&Type> {
    match strip_reference(ty) {
        Type::Slice(slice) => Some(&slice.elem),
        Type::Array(array) => Some(&array.elem),
        Type::Path(path) => {
            let segment = path.path.segments.last()?;
            if !COLLECTIONS.contains(&segment.ident.to_string().as_str()) {
                return None;
            }
            let syn::PathArguments::AngleBracketed(args) = &segment.arguments else {
                return None;
            };
            args.args.iter().find_map(|arg| match arg {
                syn::GenericArgument::Type(ty) => Some(ty),
                _ => None,
            })
        }
        Type::ImplTrait(bounds) => bounds.bounds.iter().find_map(|bound| {
            let syn::TypeParamBound::Trait(bound) = bound else {
                return None;
            };
            let syn::PathArguments::AngleBracketed(args) = &bound.path.segments.last()?.arguments
            else {
                return None;
            };
            args.args.iter().find_map(|arg| match arg {
                syn::GenericArgument::AssocType(assoc) if assoc.ident == "Item" => Some(&assoc.ty),
                _ => None,
            })
        }),
        _ => None,
    }
}

/// For a `batch` function's map (the return type, or its `Result`'s `Ok`
/// type): the type itself when it is plainly not a map (a list, a set, a
/// slice, an array or a tuple), so that the error is said at the user's
/// type rather than as an unmet bound of the runtime.
pub fn not_a_map(map: &Type) -> Option<&Type> {
    match strip_reference(map) {
        Type::Slice(_) | Type::Array(_) | Type::Tuple(_) => Some(map),
        Type::Path(path) => {
            let ident = path.path.segments.last()?.ident.to_string();
            (COLLECTIONS.contains(&ident.as_str()) || ident == "BinaryHeap").then_some(map)
        }
        _ => None,
    }
}

/// A type as the user wrote it, spaced as Rust code usually is
/// (`Vec<Product>`, not `Vec < Product >`), for messages.
pub fn text(ty: &impl quote::ToTokens) -> String {
    let raw = ty.to_token_stream().to_string();
    raw.replace(" < ", "<")
        .replace(" <", "<")
        .replace("< ", "<")
        .replace(" >", ">")
        .replace(" , ", ", ")
        .replace(" :: ", "::")
        .replace(":: ", "::")
        .replace("& ", "&")
        .replace(" ;", ";")
}

/// Whether a type has a reference without a named lifetime, or `'_`.
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

/// Whether a key function with generics `kept` (out of the cached
/// function's `declared`) can name `ret`, the cached function's return
/// type: it must not mention `impl Trait`, an elided lifetime, or a generic
/// parameter that the key function does not have.
pub fn nameable(ret: &Type, declared: &Generics, kept: &Generics) -> bool {
    let declared: BTreeSet<String> = declared.params.iter().map(param_name).collect();
    let kept: BTreeSet<String> = kept.params.iter().map(param_name).collect();
    !contains_impl_trait(ret)
        && !has_elided_lifetime(ret)
        && mentioned_names(|c| c.visit_type(ret))
            .iter()
            .all(|n| !declared.contains(n) || kept.contains(n))
}

/// The generics of the cached function restricted to the parameters that the
/// key's types mention: a key function must not have a type parameter that
/// its caller cannot infer (one used only by a skipped parameter).
pub fn used_by(generics: &Generics, types: &[&Type]) -> Generics {
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

/// Whether values of these types can outlive the call that received them
/// (`'static`, as far as the tokens tell): no reference or lifetime but
/// `'static`, no `impl Trait` or trait object, no generic parameter of
/// `declared`, no `Self`. A type that hides a lifetime (an elided
/// `Cow<str>`) or names a parameter of the surrounding impl passes, and is
/// rustc's to reject.
pub fn owned(types: &[&Type], declared: &Generics) -> bool {
    struct Finder<'g> {
        borrowed: bool,
        generics: &'g BTreeSet<String>,
    }
    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
            if r.lifetime.as_ref().is_none_or(|l| l.ident != "static") {
                self.borrowed = true;
            }
            syn::visit::visit_type_reference(self, r);
        }
        fn visit_lifetime(&mut self, lifetime: &'ast syn::Lifetime) {
            if lifetime.ident != "static" {
                self.borrowed = true;
            }
        }
        fn visit_type_impl_trait(&mut self, _: &'ast syn::TypeImplTrait) {
            self.borrowed = true;
        }
        fn visit_type_trait_object(&mut self, _: &'ast syn::TypeTraitObject) {
            self.borrowed = true;
        }
        fn visit_ident(&mut self, ident: &'ast Ident) {
            // `Self` may hold a lifetime, or a parameter of its impl.
            if ident == "Self" || self.generics.contains(&ident.to_string()) {
                self.borrowed = true;
            }
        }
    }
    let generics = declared.params.iter().map(param_name).collect();
    let mut finder = Finder {
        borrowed: false,
        generics: &generics,
    };
    for ty in types {
        finder.visit_type(ty);
    }
    !finder.borrowed
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

#[cfg(test)]
mod tests {
    use super::*;
    use quote::ToTokens;

    fn generics(src: &str) -> Generics {
        let item: syn::ItemFn = syn::parse_str(&format!("fn f{src} {{}}")).unwrap();
        item.sig.generics
    }

    fn ty(src: &str) -> Type {
        syn::parse_str(src).unwrap()
    }

    #[test]
    fn only_the_generics_the_key_needs_are_kept_with_their_bounds() {
        let declared = generics("<D: Db, K: Into<U>, U, 'a>() where K: Display, D: Sync");
        let kept = used_by(&declared, &[&ty("&K")]);
        assert_eq!(
            kept.to_token_stream().to_string(),
            "< K : Into < U > , U >",
            "D and 'a dropped, U kept for K's bound"
        );
        let where_clause = kept.where_clause.unwrap().to_token_stream().to_string();
        assert_eq!(where_clause, "where K : Display");
        assert!(used_by(&declared, &[&ty("u64")]).params.is_empty());
    }

    #[test]
    fn batch_element_types() {
        let element = |src: &str| element_type(&ty(src)).map(|t| t.to_token_stream().to_string());
        assert_eq!(element("&[u64]").as_deref(), Some("u64"));
        assert_eq!(element("&'a Vec<String>").as_deref(), Some("String"));
        assert_eq!(
            element("std::collections::HashSet<Uuid>").as_deref(),
            Some("Uuid")
        );
        assert_eq!(
            element("impl IntoIterator<Item = u32> + Send").as_deref(),
            Some("u32")
        );
        assert_eq!(element("Option<u64>"), None);
        assert_eq!(element("&str"), None);
        assert_eq!(element("u64"), None);
    }

    #[test]
    fn a_return_type_is_nameable_only_with_the_kept_generics() {
        let declared = generics("<D, K>()");
        let kept = used_by(&declared, &[&ty("K")]);
        assert!(nameable(&ty("Result<Vec<K>, E>"), &declared, &kept));
        assert!(
            !nameable(&ty("Option<D>"), &declared, &kept),
            "D is not kept"
        );
        assert!(!nameable(&ty("impl Fn()"), &declared, &kept));
        assert!(!nameable(&ty("&str"), &declared, &kept), "elided lifetime");
        assert!(contains_impl_trait(&ty("Vec<impl Display>")));
    }
}
