//! The key-template language, parsed without any proc-macro types so that it
//! can be unit-tested as plain code.
//!
//! `"org:<org.id>:member:<user_id>"` is literal text and placeholders. A
//! placeholder names a parameter (or `self`) and optionally a path of fields.

use std::fmt;

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub segments: Vec<Segment>,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Placeholder(Placeholder),
}

/// `<root.field.field>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    pub root: String,
    /// Field names or tuple indices, in order.
    pub fields: Vec<String>,
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}", self.root)?;
        for field in &self.fields {
            write!(f, ".{field}")?;
        }
        f.write_str(">")
    }
}

/// Everything that can be wrong with a template. Positions are 1-based
/// character columns inside the string literal, since a span cannot point
/// inside a string on stable Rust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    Empty,
    Unclosed { column: usize },
    UnexpectedClose { column: usize },
    EmptyPlaceholder { column: usize },
    BadPlaceholder { text: String, reason: &'static str },
    BadChar { ch: char, column: usize },
    NotSeparated { left: String, right: String },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Empty => f.write_str(
                "the key template is empty\n\
                 help: name the entry and its parameters, e.g. `key = \"user:<id>\"`",
            ),
            TemplateError::Unclosed { column } => write!(
                f,
                "`<` at column {column} of the key template is never closed\n\
                 help: a placeholder is written `<name>`"
            ),
            TemplateError::UnexpectedClose { column } => write!(
                f,
                "`>` at column {column} of the key template has no matching `<`\n\
                 help: a placeholder is written `<name>`; `<` and `>` cannot appear in literal text"
            ),
            TemplateError::EmptyPlaceholder { column } => write!(
                f,
                "empty placeholder `<>` at column {column} of the key template\n\
                 help: write the parameter's name inside, e.g. `<id>`"
            ),
            TemplateError::BadPlaceholder { text, reason } => write!(
                f,
                "invalid placeholder `<{text}>` in the key template: {reason}\n\
                 help: a placeholder is a parameter name, optionally followed by fields: `<id>`, `<user.id>`, `<self.tenant>`"
            ),
            TemplateError::BadChar { ch, column } => {
                let shown = match ch {
                    ' ' => "a space".to_owned(),
                    c if c.is_control() => format!("the control character {:?}", c),
                    c => format!("`{c}`"),
                };
                write!(
                    f,
                    "the key template contains {shown} at column {column}\n\
                     help: literal text in a key is printable ASCII without spaces; use `:` or `_` to separate words"
                )
            }
            TemplateError::NotSeparated { left, right } => write!(
                f,
                "placeholders `{left}` and `{right}` are not separated, so two different argument pairs could render to the same key\n\
                 help: put a `:` between them, e.g. `{left}:{right}` (any character other than letters, digits and `-_.~%` works)"
            ),
        }
    }
}

/// Characters that a rendered value never contains unescaped. Two
/// placeholders must be separated by at least one of them, or
/// `<a>-<b>` would render `("x-y", "z")` and `("x", "y-z")` alike.
fn separates(c: char) -> bool {
    !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '%'))
}

fn literal_char_ok(c: char) -> bool {
    c.is_ascii_graphic() && c != '<' && c != '>'
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    s != "_" && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_placeholder(text: &str, column: usize) -> Result<Placeholder, TemplateError> {
    if text.is_empty() {
        return Err(TemplateError::EmptyPlaceholder { column });
    }
    let bad = |reason| TemplateError::BadPlaceholder {
        text: text.to_owned(),
        reason,
    };
    if text.chars().any(char::is_whitespace) {
        return Err(bad("it contains whitespace"));
    }
    let mut parts = text.split('.');
    let root = parts.next().unwrap_or_default();
    if !is_ident(root) {
        return Err(bad("it must start with a parameter name"));
    }
    let mut fields = Vec::new();
    for part in parts {
        let is_index = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !(is_ident(part) || is_index) {
            return Err(bad(
                "each `.` must be followed by a field name or a tuple index",
            ));
        }
        fields.push(part.to_owned());
    }
    Ok(Placeholder {
        root: root.to_owned(),
        fields,
    })
}

/// Parses a template, reporting every error it finds rather than the first.
pub fn parse(template: &str) -> Result<Template, Vec<TemplateError>> {
    if template.is_empty() {
        return Err(vec![TemplateError::Empty]);
    }
    let mut errors = Vec::new();
    let mut segments: Vec<Segment> = Vec::new();
    let mut literal = String::new();
    let chars: Vec<char> = template.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        match c {
            '<' => {
                // A placeholder runs to the next `>`; a second `<` first means
                // this one was never closed.
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '>' || c == '<')
                    .map(|off| i + 1 + off);
                match end {
                    Some(end) if chars[end] == '>' => {
                        let text: String = chars[i + 1..end].iter().collect();
                        match parse_placeholder(&text, column) {
                            Ok(p) => {
                                if !literal.is_empty() {
                                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                                }
                                segments.push(Segment::Placeholder(p));
                            }
                            Err(e) => errors.push(e),
                        }
                        i = end + 1;
                        continue;
                    }
                    _ => errors.push(TemplateError::Unclosed { column }),
                }
            }
            '>' => errors.push(TemplateError::UnexpectedClose { column }),
            c if literal_char_ok(c) => literal.push(c),
            c => errors.push(TemplateError::BadChar { ch: c, column }),
        }
        i += 1;
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    check_separators(&segments, &mut errors);
    if errors.is_empty() {
        Ok(Template { segments })
    } else {
        Err(errors)
    }
}

fn check_separators(segments: &[Segment], errors: &mut Vec<TemplateError>) {
    let mut previous: Option<&Placeholder> = None;
    let mut separated = false;
    for segment in segments {
        match segment {
            Segment::Literal(text) => separated |= text.chars().any(separates),
            Segment::Placeholder(p) => {
                if let (Some(left), false) = (previous, separated) {
                    errors.push(TemplateError::NotSeparated {
                        left: left.to_string(),
                        right: p.to_string(),
                    });
                }
                previous = Some(p);
                separated = false;
            }
        }
    }
}

impl Template {
    /// The placeholders, in order of appearance.
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Placeholder(p) => Some(p),
            Segment::Literal(_) => None,
        })
    }

    /// Length of the literal text, a capacity hint for rendering.
    pub fn literal_len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.len(),
                Segment::Placeholder(_) => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Segment {
        Segment::Literal(s.to_owned())
    }

    fn ph(root: &str, fields: &[&str]) -> Segment {
        Segment::Placeholder(Placeholder {
            root: root.to_owned(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        })
    }

    #[test]
    fn parses_literals_and_placeholders() {
        let t = parse("org:<org.id>:member:<user_id>").unwrap();
        assert_eq!(
            t.segments,
            vec![
                lit("org:"),
                ph("org", &["id"]),
                lit(":member:"),
                ph("user_id", &[])
            ]
        );
        assert_eq!(t.literal_len(), "org::member:".len());
    }

    #[test]
    fn accepts_self_tuple_indices_hash_tags_and_bare_placeholders() {
        assert_eq!(
            parse("tenant:<self.tenant>:<pair.0>").unwrap().segments,
            vec![
                lit("tenant:"),
                ph("self", &["tenant"]),
                lit(":"),
                ph("pair", &["0"])
            ]
        );
        assert_eq!(
            parse("{user:<id>}:profile").unwrap().segments,
            vec![lit("{user:"), ph("id", &[]), lit("}:profile")]
        );
        assert_eq!(parse("<id>").unwrap().segments, vec![ph("id", &[])]);
        assert_eq!(parse("health").unwrap().segments, vec![lit("health")]);
    }

    #[test]
    fn empty_template() {
        assert_eq!(parse(""), Err(vec![TemplateError::Empty]));
    }

    #[test]
    fn unbalanced_brackets() {
        assert_eq!(
            parse("user:<id"),
            Err(vec![TemplateError::Unclosed { column: 6 }])
        );
        assert_eq!(
            parse("user:id>"),
            Err(vec![TemplateError::UnexpectedClose { column: 8 }])
        );
        // The first `<` is unclosed; the second placeholder still parses.
        assert_eq!(
            parse("a:<b:<c>"),
            Err(vec![TemplateError::Unclosed { column: 3 }])
        );
    }

    #[test]
    fn empty_and_malformed_placeholders() {
        assert_eq!(
            parse("user:<>"),
            Err(vec![TemplateError::EmptyPlaceholder { column: 6 }])
        );
        for bad in ["<1id>", "<a..b>", "<a.>", "<.a>", "<a-b>", "<_>", "<a b>"] {
            let errors = parse(bad).unwrap_err();
            assert!(
                matches!(errors[..], [TemplateError::BadPlaceholder { .. }]),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn rejects_spaces_and_non_printable_characters() {
        assert_eq!(
            parse("user <id>"),
            Err(vec![TemplateError::BadChar { ch: ' ', column: 5 }])
        );
        assert_eq!(
            parse("usér:<id>"),
            Err(vec![TemplateError::BadChar {
                ch: 'é', column: 3
            }])
        );
        assert_eq!(
            parse("a\tb"),
            Err(vec![TemplateError::BadChar {
                ch: '\t',
                column: 2
            }])
        );
    }

    #[test]
    fn reports_every_error_not_just_the_first() {
        let errors = parse("a b:<>:c>:<x").unwrap_err();
        assert_eq!(
            errors,
            vec![
                TemplateError::BadChar { ch: ' ', column: 2 },
                TemplateError::EmptyPlaceholder { column: 5 },
                TemplateError::UnexpectedClose { column: 9 },
                TemplateError::Unclosed { column: 11 },
            ]
        );
    }

    #[test]
    fn adjacent_placeholders_need_a_separator_values_cannot_contain() {
        assert!(matches!(
            parse("<a><b>").unwrap_err()[..],
            [TemplateError::NotSeparated { .. }]
        ));
        // `-` and `_` can occur in rendered values, so they do not separate.
        assert!(parse("<a>-<b>").is_err());
        assert!(parse("<a>_x_<b>").is_err());
        assert!(parse("<a>:<b>").is_ok());
        assert!(parse("<a>/<b>,<c>").is_ok());
    }

    #[test]
    fn errors_render_helpful_messages() {
        let msg = parse("user:<i d>").unwrap_err()[0].to_string();
        assert!(msg.contains("`<i d>`") && msg.contains("help:"), "{msg}");
        let msg = parse("<a><b>").unwrap_err()[0].to_string();
        assert!(msg.contains("`<a>:<b>`"), "{msg}");
    }
}
