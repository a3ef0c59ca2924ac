//! `Selector`: a `type:value` fact about a node or workload, e.g. `unix:uid:1000`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest selector value accepted, in bytes.
pub const MAX_SELECTOR_LEN: usize = 1024;

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No `:` separating type and value.
    #[error("selector {0:?} must be TYPE:VALUE (e.g. unix:uid:1000)")]
    MissingSeparator(String),
    /// Empty type before the first `:`.
    #[error("selector {0:?} has an empty type")]
    EmptyType(String),
    /// Empty value after the first `:`.
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    /// Type has characters outside `[a-z0-9_]`.
    #[error("selector type {0:?} may only contain a-z, 0-9 and _")]
    BadType(String),
    /// A control character in the value.
    #[error("selector {0:?} contains a control character")]
    ControlChar(String),
    /// A type no attestor produces: an entry with it could never match.
    #[error("selector type {0:?} is unknown (known: unix, x509pop)")]
    UnknownType(String),
    /// A known type with a value its attestor never produces.
    #[error("selector {selector:?}: {reason}")]
    BadValue {
        /// The selector.
        selector: String,
        /// What a valid value looks like.
        reason: &'static str,
    },
    /// Longer than [`MAX_SELECTOR_LEN`].
    #[error("selector is {len} bytes, more than the maximum of {MAX_SELECTOR_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

/// A selector: the attestor type (`unix`, `join_token`, ...) and its value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    full: String,
    type_end: usize,
}

impl Selector {
    /// Parses `TYPE:VALUE`; the value may itself contain `:`.
    pub fn new(input: &str) -> Result<Self, SelectorError> {
        if input.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong { len: input.len() });
        }
        let Some((ty, value)) = input.split_once(':') else {
            return Err(SelectorError::MissingSeparator(input.to_string()));
        };
        if ty.is_empty() {
            return Err(SelectorError::EmptyType(input.to_string()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(input.to_string()));
        }
        if !ty
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(SelectorError::BadType(ty.to_string()));
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar(input.to_string()));
        }
        Ok(Selector {
            full: input.to_string(),
            type_end: ty.len(),
        })
    }

    /// Checks the value against what its attestor produces, so an entry can
    /// never carry a selector that silently matches nothing: `unix:uid:N`,
    /// `unix:gid:N`, `unix:supplementary_gid:N` (N a 32-bit number),
    /// `unix:user:NAME`, `unix:group:NAME`, `unix:path:/ABS`,
    /// `unix:sha256:HEX64`, `x509pop:subject:cn:CN`,
    /// `x509pop:fingerprint:HEX64`. Other types are unknown.
    pub fn check_known(&self) -> Result<(), SelectorError> {
        let bad = |reason| {
            Err(SelectorError::BadValue {
                selector: self.full.clone(),
                reason,
            })
        };
        let hex64 =
            |v: &str| v.len() == 64 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let (key, value) = self.value().split_once(':').unwrap_or((self.value(), ""));
        match (self.kind(), key) {
            ("unix", "uid" | "gid" | "supplementary_gid") => match value.parse::<u32>() {
                Ok(_) => Ok(()),
                Err(_) => bad("the value must be a number (0 to 4294967295)"),
            },
            ("unix", "user" | "group") if !value.is_empty() => Ok(()),
            ("unix", "path") if value.starts_with('/') => Ok(()),
            ("unix", "sha256") if hex64(value) => Ok(()),
            ("unix", "path") => bad("the path must be absolute"),
            ("unix", "sha256") => bad("the value must be 64 lowercase hex digits"),
            ("unix", _) => {
                bad("unix selectors are uid, gid, supplementary_gid, user, group, path or sha256")
            }
            ("x509pop", "subject")
                if value.strip_prefix("cn:").is_some_and(|cn| !cn.is_empty()) =>
            {
                Ok(())
            }
            ("x509pop", "fingerprint") if hex64(value) => Ok(()),
            ("x509pop", _) => bad("x509pop selectors are subject:cn:NAME or fingerprint:HEX64"),
            (other, _) => Err(SelectorError::UnknownType(other.to_string())),
        }
    }

    /// Builds a selector from a type and value.
    pub fn from_parts(ty: &str, value: &str) -> Result<Self, SelectorError> {
        Self::new(&format!("{ty}:{value}"))
    }

    /// The type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.full[..self.type_end]
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.full[self.type_end + 1..]
    }

    /// The whole selector as `type:value`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

/// True when every selector in `required` is among `have`: the rule that
/// decides whether a workload or node may receive an entry.
pub fn is_subset(required: &[Selector], have: &[Selector]) -> bool {
    required.iter().all(|r| have.contains(r))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({})", self.full)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Selector::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_type_and_value() {
        let s = Selector::new("unix:uid:1000").unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert_eq!(Selector::from_parts("unix", "uid:1000").unwrap(), s);
    }

    #[test]
    fn rejects_bad_selectors() {
        assert!(matches!(
            Selector::new("unix"),
            Err(SelectorError::MissingSeparator(_))
        ));
        assert!(matches!(
            Selector::new(":x"),
            Err(SelectorError::EmptyType(_))
        ));
        assert!(matches!(
            Selector::new("unix:"),
            Err(SelectorError::EmptyValue(_))
        ));
        assert!(matches!(
            Selector::new("Unix:x"),
            Err(SelectorError::BadType(_))
        ));
        assert!(matches!(
            Selector::new("unix:a\nb"),
            Err(SelectorError::ControlChar(_))
        ));
        let long = format!("unix:{}", "a".repeat(1100));
        assert!(matches!(
            Selector::new(&long),
            Err(SelectorError::TooLong { .. })
        ));
    }

    #[test]
    fn subset() {
        let a = Selector::new("unix:uid:1").unwrap();
        let b = Selector::new("unix:gid:2").unwrap();
        assert!(is_subset(std::slice::from_ref(&a), &[a.clone(), b.clone()]));
        assert!(!is_subset(&[a.clone(), b.clone()], &[a]));
        assert!(is_subset(&[], &[b]));
    }
}
