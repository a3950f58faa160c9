//! The annotated function as a typed model that borrows the syn nodes, so
//! that every later stage can point its errors at the user's tokens.

use syn::{Expr, ExprAsync, FnArg, Ident, ItemFn, Pat, PatType, Receiver, ReturnType, Stmt, Type};

/// A function under `#[redis_cached]`, `#[invalidates]` or `#[cache_put]`.
pub struct AnnotatedFn<'a> {
    pub item: &'a ItemFn,
    pub asyncness: Asyncness<'a>,
    pub receiver: Option<&'a Receiver>,
    /// The named parameters, receiver excluded, in declaration order.
    pub params: Vec<Param<'a>>,
    /// Parameters that are patterns (`(a, b): (u8, u8)`), not plain names: a
    /// key template cannot name them.
    pub unnamed: Vec<&'a Pat>,
    pub output: Output<'a>,
}

/// How the function is async.
#[derive(Clone, Copy)]
pub enum Asyncness<'a> {
    /// `async fn`.
    Native,
    /// What `#[async_trait]` made of an `async fn` (it expands first when it
    /// is the outer attribute): a plain fn returning
    /// `Pin<Box<dyn Future<Output = R> + Send + 'async_trait>>` whose body
    /// is `Box::pin(async move { … })`. tracing-attributes recognises the
    /// same shape. `ret_at` is the statement `let __ret: R = { body };` in
    /// which `#[async_trait]` put the user's body, after rebinding the
    /// parameters (and `self` as `__self`).
    AsyncTrait {
        block: &'a ExprAsync,
        ret_at: Option<usize>,
    },
    /// Not async: an error.
    Not,
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
        let (asyncness, declared) = match (item.sig.asyncness, async_trait_output(item)) {
            (Some(_), _) => (Asyncness::Native, returned(&item.sig.output)),
            (None, Some((block, output))) => (
                Asyncness::AsyncTrait {
                    block,
                    ret_at: block
                        .block
                        .stmts
                        .iter()
                        .position(|s| ret_block(s).is_some()),
                },
                Some(output),
            ),
            (None, None) => (Asyncness::Not, returned(&item.sig.output)),
        };
        let output = match declared {
            None => Output {
                ty: None,
                shape: Shape::Plain,
                impl_trait: false,
            },
            Some(ty) => Output {
                ty: Some(ty),
                shape: shape_of(ty),
                impl_trait: crate::types::contains_impl_trait(ty),
            },
        };
        AnnotatedFn {
            item,
            asyncness,
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

    /// The statements of the user's body: for `#[async_trait]`'s output,
    /// those of its `let __ret = { body };` (else of its whole block).
    pub fn body(&self) -> &'a [Stmt] {
        match self.asyncness {
            Asyncness::AsyncTrait {
                block,
                ret_at: Some(at),
            } => ret_block(&block.block.stmts[at]).map_or(&[], |b| &b.stmts),
            Asyncness::AsyncTrait {
                block,
                ret_at: None,
            } => &block.block.stmts,
            Asyncness::Native | Asyncness::Not => &self.item.block.stmts,
        }
    }
}

/// The block of `#[async_trait]`'s `let __ret: R = { body };`.
pub fn ret_block(stmt: &Stmt) -> Option<&syn::Block> {
    let Stmt::Local(local) = stmt else {
        return None;
    };
    let Pat::Type(typed) = &local.pat else {
        return None;
    };
    let Pat::Ident(ident) = &*typed.pat else {
        return None;
    };
    match local.init.as_ref().map(|init| &*init.expr) {
        Some(Expr::Block(block)) if ident.ident == "__ret" => Some(&block.block),
        _ => None,
    }
}

fn returned(output: &ReturnType) -> Option<&Type> {
    match output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some(ty),
    }
}

/// For `#[async_trait]`'s output, its `async move` block and the future's
/// `Output` type.
fn async_trait_output(item: &ItemFn) -> Option<(&ExprAsync, &Type)> {
    let Some(Stmt::Expr(Expr::Call(call), None)) = item.block.stmts.last() else {
        return None;
    };
    let Expr::Path(callee) = &*call.func else {
        return None;
    };
    let names: Vec<String> = callee
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    if !names.ends_with(&["Box".to_owned(), "pin".to_owned()]) || call.args.len() != 1 {
        return None;
    }
    let Some(Expr::Async(block)) = call.args.first() else {
        return None;
    };
    Some((block, future_output(returned(&item.sig.output)?)?))
}

/// `R` in `Pin<Box<dyn Future<Output = R> + …>>`.
fn future_output(ty: &Type) -> Option<&Type> {
    let (pin, Some(boxed)) = last_segment(ty)? else {
        return None;
    };
    let (boxed_name, Some(Type::TraitObject(object))) = last_segment(boxed)? else {
        return None;
    };
    if pin != "Pin" || boxed_name != "Box" {
        return None;
    }
    object.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let future = bound.path.segments.last()?;
        let syn::PathArguments::AngleBracketed(args) = &future.arguments else {
            return None;
        };
        if future.ident != "Future" {
            return None;
        }
        args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::AssocType(assoc) if assoc.ident == "Output" => Some(&assoc.ty),
            _ => None,
        })
    })
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
pub(crate) fn last_segment(ty: &Type) -> Option<(&Ident, Option<&Type>)> {
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

    #[test]
    fn async_trait_output_is_recognised() {
        let item: ItemFn = syn::parse_quote! {
            fn get<'life0, 'async_trait>(&'life0 self, id: u64)
                -> ::core::pin::Pin<Box<dyn ::core::future::Future<Output = Result<Option<u8>, E>> + ::core::marker::Send + 'async_trait>>
            where 'life0: 'async_trait, Self: 'async_trait
            {
                Box::pin(async move { let __self = self; Ok(None) })
            }
        };
        let func = AnnotatedFn::from_item(&item);
        assert!(matches!(
            func.asyncness,
            Asyncness::AsyncTrait { ret_at: None, .. }
        ));
        assert_eq!(func.output.shape, Shape::ResultOption);
        assert_eq!(func.body().len(), 2);
        let item: ItemFn = syn::parse_quote! {
            fn get<'life0, 'async_trait>(&'life0 self, id: u64)
                -> Pin<Box<dyn Future<Output = u8> + Send + 'async_trait>>
            {
                Box::pin(async move {
                    let __self = self;
                    let id = id;
                    let __ret: u8 = { let x = 1; x };
                    __ret
                })
            }
        };
        let func = AnnotatedFn::from_item(&item);
        assert!(matches!(
            func.asyncness,
            Asyncness::AsyncTrait {
                ret_at: Some(2),
                ..
            }
        ));
        assert_eq!(func.body().len(), 2);
        let plain: ItemFn = syn::parse_quote!(
            fn get() -> Box<u8> {
                Box::new(1)
            }
        );
        assert!(matches!(
            AnnotatedFn::from_item(&plain).asyncness,
            Asyncness::Not
        ));
    }
}
