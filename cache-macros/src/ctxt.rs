//! Error collection: parsing and validation go on after an error so that the
//! user sees every mistake of one attribute at once (serde_derive's `Ctxt`).

use std::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;

/// Collects errors and combines them into one `syn::Error`.
#[derive(Default)]
pub struct Errors {
    combined: Option<syn::Error>,
}

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.combined {
            Some(combined) => combined.combine(error),
            None => self.combined = Some(error),
        }
    }

    pub fn at(&mut self, span: Span, message: impl Display) {
        self.push(syn::Error::new(span, message));
    }

    pub fn spanned(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub fn has_errors(&self) -> bool {
        self.combined.is_some()
    }

    pub fn finish(self) -> Result<(), syn::Error> {
        self.combined.map_or(Ok(()), Err)
    }
}

/// "did you mean `id`?" when a candidate is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(wrong, c), c))
        .filter(|&(distance, c)| distance <= (c.len().max(wrong.len()) / 3).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, c)| c)
}

/// `"; did you mean `id`?"`, or nothing.
pub fn hint(suggestion: Option<&str>) -> String {
    suggestion.map_or_else(String::new, |close| format!("; did you mean `{close}`?"))
}
