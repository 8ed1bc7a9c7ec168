//! The one place SQL text is built from names and values.
//!
//! Invariants:
//! - Every identifier that reaches SQL goes through [`quote_ident`]; every literal that
//!   cannot be a bind parameter (replication commands have no parameters) goes through
//!   [`quote_literal`]. No other module formats raw names into SQL.
//! - NUL bytes cannot be represented in PostgreSQL text; names containing them are refused
//!   rather than truncated.

use std::fmt;

/// How a COPY statement carries rows: binary where every column type is built in (its
/// binary form is stable across versions), text otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Binary,
}

impl CopyFormat {
    /// Binary when every column type (by OID) is built in, else text.
    pub fn for_type_oids(oids: impl IntoIterator<Item = u32>) -> CopyFormat {
        // OIDs below this are the system's own types.
        const FIRST_NORMAL_OID: u32 = 16384;
        if oids.into_iter().all(|o| o < FIRST_NORMAL_OID) {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        }
    }
}

/// Why a name cannot be used in SQL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name {0:?} contains a NUL byte")]
    Nul(String),
    #[error("name {name:?} is longer than PostgreSQL's {max} bytes")]
    TooLong { name: String, max: usize },
    #[error("table name {0:?} must be written schema.table")]
    Unqualified(String),
}

/// PostgreSQL's NAMEDATALEN - 1: longer identifiers are silently truncated by the server,
/// which would make two different configured names collide.
pub const MAX_IDENT_BYTES: usize = 63;

pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.contains('\0') {
        return Err(NameError::Nul(name.to_owned()));
    }
    if name.len() > MAX_IDENT_BYTES {
        return Err(NameError::TooLong {
            name: name.to_owned(),
            max: MAX_IDENT_BYTES,
        });
    }
    Ok(())
}

/// Double-quotes an identifier, doubling embedded quotes: always safe, whatever the text.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Single-quotes a literal for contexts that take no bind parameters. Uses the `E''` form
/// when backslashes are present so the result does not depend on
/// `standard_conforming_strings`.
pub fn quote_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    if text.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A typed array of literals for contexts that take no bind parameters (a trigger's WHEN,
/// a publication's row filter): `ARRAY['a', 'b']::element[]`. `element` is a type name as
/// the server formats it (`format_type`), never user text.
pub fn typed_array(values: &[String], element: &str) -> String {
    let items: Vec<String> = values.iter().map(|v| quote_literal(v)).collect();
    format!("ARRAY[{}]::{element}[]", items.join(", "))
}

/// A schema-qualified relation name as configured (`schema.table`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Result<Self, NameError> {
        let q = QualifiedName {
            schema: schema.into(),
            name: name.into(),
        };
        check_name(&q.schema)?;
        check_name(&q.name)?;
        Ok(q)
    }

    /// Parses `schema.table`; either part may be double-quoted to contain dots.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let parts = split_dotted(text).ok_or_else(|| NameError::Unqualified(text.to_owned()))?;
        match parts.as_slice() {
            [schema, name] => QualifiedName::new(schema.clone(), name.clone()),
            _ => Err(NameError::Unqualified(text.to_owned())),
        }
    }

    /// The quoted form for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Splits `a.b` / `"a.x"."b"` into parts; `None` on an unterminated quote or empty part.
fn split_dotted(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted_part = true;
                loop {
                    match chars.next()? {
                        '"' if chars.peek() == Some(&'"') => {
                            chars.next();
                            cur.push('"');
                        }
                        '"' => break,
                        c => cur.push(c),
                    }
                }
            }
            '.' => {
                if cur.is_empty() && !quoted_part {
                    return None;
                }
                parts.push(std::mem::take(&mut cur));
                quoted_part = false;
            }
            c => cur.push(c),
        }
    }
    if cur.is_empty() && !quoted_part {
        return None;
    }
    parts.push(cur);
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_arrays_quote_every_value() {
        let values = ["1".to_string(), "2'x".to_string()];
        assert_eq!(
            typed_array(&values, "integer"),
            "ARRAY['1', '2''x']::integer[]"
        );
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("x\"; DROP TABLE t; --"),
            "\"x\"\"; DROP TABLE t; --\""
        );
    }

    #[test]
    fn quoted_names_parse_back_exactly() {
        for (schema, name) in [
            ("public", "orders"),
            ("public", "we\"ird; DROP TABLE public.accounts; --"),
            ("a.b", "c\"\".d"),
            ("s\"; DROP SCHEMA public CASCADE; --", "x"),
        ] {
            let q = QualifiedName::new(schema.to_string(), name.to_string()).unwrap();
            assert_eq!(
                QualifiedName::parse(&q.quoted()).unwrap(),
                q,
                "{}",
                q.quoted()
            );
        }
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }

    #[test]
    fn qualified_names_parse() {
        let q = QualifiedName::parse("public.orders").unwrap();
        assert_eq!((q.schema.as_str(), q.name.as_str()), ("public", "orders"));
        let q = QualifiedName::parse("\"my.schema\".\"Odd\"\"Name\"").unwrap();
        assert_eq!(q.schema, "my.schema");
        assert_eq!(q.name, "Odd\"Name");
        assert_eq!(q.quoted(), "\"my.schema\".\"Odd\"\"Name\"");
        for bad in ["orders", "a.b.c", ".x", "x.", "\"open.x", ""] {
            assert!(QualifiedName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_with_nul_or_too_long_are_refused() {
        assert!(matches!(check_name("a\0b"), Err(NameError::Nul(_))));
        assert!(matches!(
            check_name(&"x".repeat(64)),
            Err(NameError::TooLong { .. })
        ));
        assert!(check_name(&"x".repeat(63)).is_ok());
    }
}
