//! The annotated function as a typed model that borrows the syn nodes, so
//! that every later stage can point its errors at the user's tokens.

use syn::{FnArg, Ident, ItemFn, Pat, PatType, Receiver, ReturnType, Type};

/// A function under `#[redis_cached]`, `#[invalidates]` or `#[cache_put]`.
pub struct AnnotatedFn<'a> {
    pub item: &'a ItemFn,
    pub receiver: Option<&'a Receiver>,
    /// The named parameters, receiver excluded, in declaration order.
    pub params: Vec<Param<'a>>,
    /// Parameters that are patterns (`(a, b): (u8, u8)`), not plain names: a
    /// key template cannot name them.
    pub unnamed: Vec<&'a Pat>,
    pub output: Output<'a>,
}

/// A named parameter: `id: u64`, `mut name: String`.
#[derive(Clone, Copy)]
pub struct Param<'a> {
    pub ident: &'a Ident,
    pub ty: &'a Type,
    pub arg: &'a PatType,
}

/// How a return type decides what is cached, detected by the last path
/// segment so that aliases such as `anyhow::Result<T>` work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `Result<T, E>`: `Ok` is cached.
    Result,
    /// `Option<T>`: `Some` is cached.
    Option,
    /// `Result<Option<T>, E>`: `Ok(Some)` is cached.
    ResultOption,
    /// Anything else is cached as is.
    Plain,
}

/// The declared return type and its shape.
pub struct Output<'a> {
    /// `None` for a function without `->`, which returns `()`.
    pub ty: Option<&'a Type>,
    pub shape: Shape,
    /// Whether it mentions `impl Trait`, which generated code cannot name.
    pub impl_trait: bool,
}

impl<'a> AnnotatedFn<'a> {
    /// Builds the model.
    pub fn from_item(item: &'a ItemFn) -> Self {
        let mut receiver = None;
        let mut params = Vec::new();
        let mut unnamed = Vec::new();
        for input in &item.sig.inputs {
            match input {
                FnArg::Receiver(r) => receiver = Some(r),
                FnArg::Typed(arg) => match &*arg.pat {
                    Pat::Ident(pat) if pat.subpat.is_none() && pat.by_ref.is_none() => {
                        params.push(Param {
                            ident: &pat.ident,
                            ty: &arg.ty,
                            arg,
                        })
                    }
                    other => unnamed.push(other),
                },
            }
        }
        let output = match &item.sig.output {
            ReturnType::Default => Output {
                ty: None,
                shape: Shape::Plain,
                impl_trait: false,
            },
            ReturnType::Type(_, ty) => Output {
                ty: Some(ty),
                shape: shape_of(ty),
                impl_trait: crate::types::contains_impl_trait(ty),
            },
        };
        AnnotatedFn {
            item,
            receiver,
            params,
            unnamed,
            output,
        }
    }

    pub fn name(&self) -> &'a Ident {
        &self.item.sig.ident
    }

    pub fn param(&self, name: &str) -> Option<&Param<'a>> {
        self.params.iter().find(|p| p.ident == name)
    }
}

fn unwrap_groups(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Paren(inner) => ty = &inner.elem,
            Type::Group(inner) => ty = &inner.elem,
            other => return other,
        }
    }
}

/// The last path segment of a type and its first generic type argument.
fn last_segment(ty: &Type) -> Option<(&Ident, Option<&Type>)> {
    let Type::Path(path) = unwrap_groups(ty) else {
        return None;
    };
    let segment = path.path.segments.last()?;
    let first_arg = match &segment.arguments {
        syn::PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::Type(ty) => Some(ty),
            _ => None,
        }),
        _ => None,
    };
    Some((&segment.ident, first_arg))
}

fn shape_of(ty: &Type) -> Shape {
    match last_segment(ty) {
        Some((ident, inner)) if ident == "Result" => match inner.and_then(last_segment) {
            Some((inner, _)) if inner == "Option" => Shape::ResultOption,
            _ => Shape::Result,
        },
        Some((ident, _)) if ident == "Option" => Shape::Option,
        _ => Shape::Plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(src: &str) -> Shape {
        shape_of(&syn::parse_str::<Type>(src).unwrap())
    }

    #[test]
    fn shapes_are_detected_by_the_last_segment() {
        assert_eq!(shape("Result<User, DbError>"), Shape::Result);
        assert_eq!(shape("anyhow::Result<User>"), Shape::Result);
        assert_eq!(shape("std::io::Result<Option<u8>>"), Shape::ResultOption);
        assert_eq!(
            shape("Result<std::option::Option<u8>, E>"),
            Shape::ResultOption
        );
        assert_eq!(shape("Option<User>"), Shape::Option);
        assert_eq!(shape("(Option<User>)"), Shape::Option);
        assert_eq!(shape("Vec<User>"), Shape::Plain);
        assert_eq!(shape("(u8, u8)"), Shape::Plain);
    }
}
