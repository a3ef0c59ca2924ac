//! `SpiffeId` and `TrustDomain`: validated on construction, never after.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Maximum length of a whole SPIFFE ID, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID or trust domain: one variant per rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("SPIFFE ID {0:?} must start with \"spiffe://\"")]
    WrongScheme(String),
    /// A trust domain given as an empty string.
    #[error("trust domain is empty (e.g. example.org)")]
    EmptyTrustDomain,
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID {0:?} has no trust domain")]
    MissingTrustDomain(String),
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    #[error("trust domain {domain:?} has invalid character {character:?} (allowed: a-z 0-9 . - _)")]
    BadTrustDomainChar {
        /// The trust domain as given.
        domain: String,
        /// The first offending character.
        character: char,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {len} bytes, more than the maximum of {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A `:port` after the trust domain.
    #[error("SPIFFE ID {0:?} must not contain a port")]
    Port(String),
    /// A `user@` before the trust domain.
    #[error("SPIFFE ID {0:?} must not contain userinfo")]
    UserInfo(String),
    /// A `?query`.
    #[error("SPIFFE ID {0:?} must not contain a query")]
    Query(String),
    /// A `#fragment`.
    #[error("SPIFFE ID {0:?} must not contain a fragment")]
    Fragment(String),
    /// A `%xx` escape.
    #[error("SPIFFE ID {0:?} must not contain percent-encoding")]
    PercentEncoded(String),
    /// `//` in the path.
    #[error("SPIFFE ID {0:?} has an empty path segment")]
    EmptySegment(String),
    /// A `.` or `..` segment.
    #[error("SPIFFE ID {id:?} has a {segment:?} path segment")]
    DotSegment {
        /// The whole ID.
        id: String,
        /// `.` or `..`.
        segment: String,
    },
    /// A path character outside `[a-zA-Z0-9.-_]`.
    #[error(
        "SPIFFE ID {id:?} has invalid path character {character:?} (allowed: a-z A-Z 0-9 . - _)"
    )]
    BadPathChar {
        /// The whole ID.
        id: String,
        /// The first offending character.
        character: char,
    },
    /// The path ends with `/`.
    #[error("SPIFFE ID {0:?} must not end with '/'")]
    TrailingSlash(String),
    /// The whole ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {len} bytes, more than the maximum of {MAX_ID_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A SPIFFE ID was given where a bare trust domain was expected.
    #[error("{0:?} is a SPIFFE ID with a path, not a trust domain")]
    NotATrustDomain(String),
}

/// A SPIFFE trust domain, e.g. `example.org`. Always lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Parses a trust domain from its bare name (`example.org`) or its ID
    /// form (`spiffe://example.org`). Upper case is folded to lower case.
    pub fn new(input: &str) -> Result<Self, IdError> {
        let has_scheme = input
            .get(..SCHEME.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(SCHEME));
        if has_scheme {
            let id = SpiffeId::new(input)?;
            if !id.path().is_empty() {
                return Err(IdError::NotATrustDomain(input.to_string()));
            }
            return Ok(id.trust_domain());
        }
        if input.is_empty() {
            return Err(IdError::EmptyTrustDomain);
        }
        validate_trust_domain(input, input)
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The trust domain's own ID, `spiffe://<td>`, used as bundle map key.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            td_end: SCHEME.len() + self.name.len(),
            full: format!("{SCHEME}{}", self.name),
        }
    }

    /// Builds the ID `spiffe://<td>/<segments joined by '/'>`, validating each segment.
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, IdError> {
        let full = if path.starts_with('/') {
            format!("{SCHEME}{}{path}", self.name)
        } else {
            format!("{SCHEME}{}/{path}", self.name)
        };
        SpiffeId::new(&full)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn validate_trust_domain(domain: &str, whole: &str) -> Result<TrustDomain, IdError> {
    if domain.is_empty() {
        return Err(IdError::MissingTrustDomain(whole.to_string()));
    }
    if domain.contains('@') {
        return Err(IdError::UserInfo(whole.to_string()));
    }
    if domain.contains(':') {
        return Err(IdError::Port(whole.to_string()));
    }
    if domain.contains('%') {
        return Err(IdError::PercentEncoded(whole.to_string()));
    }
    if domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: domain.len() });
    }
    let lower = domain.to_ascii_lowercase();
    if let Some(c) = lower
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(IdError::BadTrustDomainChar {
            domain: domain.to_string(),
            character: c,
        });
    }
    Ok(TrustDomain { name: lower })
}

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`. The scheme and trust domain
/// are stored lowercase (they compare case-insensitively); the path is kept as
/// given (it is case-sensitive).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    td_end: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID against every rule of the SPIFFE-ID spec.
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: input.len() });
        }
        let rest = match input.get(..SCHEME.len()) {
            Some(p) if p.eq_ignore_ascii_case(SCHEME) => &input[SCHEME.len()..],
            _ => return Err(IdError::WrongScheme(input.to_string())),
        };
        // Query and fragment end the authority and the path alike, so look for them first.
        if rest.contains('#') {
            return Err(IdError::Fragment(input.to_string()));
        }
        if rest.contains('?') {
            return Err(IdError::Query(input.to_string()));
        }
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let td = validate_trust_domain(domain, input)?;
        validate_path(path, input)?;
        Ok(SpiffeId {
            td_end: SCHEME.len() + td.name.len(),
            full: format!("{SCHEME}{}{path}", td.name),
        })
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            name: self.full[SCHEME.len()..self.td_end].to_string(),
        }
    }

    /// The trust domain name, borrowed.
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME.len()..self.td_end]
    }

    /// The path, starting with `/`, or empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// True when this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name
    }
}

fn validate_path(path: &str, whole: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    if path.contains('%') {
        return Err(IdError::PercentEncoded(whole.to_string()));
    }
    // `path` starts with '/', so the first split piece is always "".
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "" if i == last => return Err(IdError::TrailingSlash(whole.to_string())),
            "" => return Err(IdError::EmptySegment(whole.to_string())),
            "." | ".." => {
                return Err(IdError::DotSegment {
                    id: whole.to_string(),
                    segment: segment.to_string(),
                });
            }
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::BadPathChar {
                id: whole.to_string(),
                character: c,
            });
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> IdError {
        match SpiffeId::new(s) {
            Err(e) => e,
            Ok(id) => panic!("{s:?} parsed as {id}"),
        }
    }

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default/sa/api",
            "spiffe://a-b_c.d0/A.b-C_9",
            "spiffe://example.org/...x/a..b",
        ] {
            let id = SpiffeId::new(s).unwrap();
            assert_eq!(id.as_str(), s);
        }
    }

    #[test]
    fn each_rule_has_its_own_error() {
        assert_eq!(err(""), IdError::Empty);
        assert!(matches!(
            err("http://example.org/a"),
            IdError::WrongScheme(_)
        ));
        assert!(matches!(
            err("spiffe:/example.org"),
            IdError::WrongScheme(_)
        ));
        assert!(matches!(err("spiffe:///a"), IdError::MissingTrustDomain(_)));
        assert!(matches!(err("spiffe://"), IdError::MissingTrustDomain(_)));
        assert!(matches!(
            err("spiffe://exa$mple.org/a"),
            IdError::BadTrustDomainChar { character: '$', .. }
        ));
        assert!(matches!(
            err("spiffe://example.org:8080/a"),
            IdError::Port(_)
        ));
        assert!(matches!(
            err("spiffe://user@example.org/a"),
            IdError::UserInfo(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a?x=1"),
            IdError::Query(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a#frag"),
            IdError::Fragment(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a%20b"),
            IdError::PercentEncoded(_)
        ));
        assert!(matches!(
            err("spiffe://example.org//a"),
            IdError::EmptySegment(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/a//b"),
            IdError::EmptySegment(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/./a"),
            IdError::DotSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://example.org/a/.."),
            IdError::DotSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://example.org/a b"),
            IdError::BadPathChar { character: ' ', .. }
        ));
        assert!(matches!(
            err("spiffe://example.org/é"),
            IdError::BadPathChar {
                character: 'é', ..
            }
        ));
        assert!(matches!(
            err("spiffe://example.org/a/"),
            IdError::TrailingSlash(_)
        ));
        assert!(matches!(
            err("spiffe://example.org/"),
            IdError::TrailingSlash(_)
        ));
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert_eq!(err(&long_td), IdError::TrustDomainTooLong { len: 256 });
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        assert!(matches!(err(&long), IdError::TooLong { .. }));
    }

    #[test]
    fn limits_are_inclusive() {
        let td = "a".repeat(255);
        assert!(SpiffeId::new(&format!("spiffe://{td}/x")).is_ok());
        let prefix = "spiffe://example.org/";
        let id = format!("{prefix}{}", "a".repeat(2048 - prefix.len()));
        assert_eq!(id.len(), 2048);
        assert!(SpiffeId::new(&id).is_ok());
    }

    #[test]
    fn scheme_and_domain_fold_case_path_does_not() {
        let a = SpiffeId::new("SPIFFE://Example.ORG/Path").unwrap();
        let b = SpiffeId::new("spiffe://example.org/Path").unwrap();
        let c = SpiffeId::new("spiffe://example.org/path").unwrap();
        assert_eq!(a, b);
        assert_ne!(b, c);
        assert_eq!(a.to_string(), "spiffe://example.org/Path");
    }

    #[test]
    fn parts() {
        let id = SpiffeId::new("spiffe://example.org/ns/x").unwrap();
        assert_eq!(id.trust_domain().name(), "example.org");
        assert_eq!(id.path(), "/ns/x");
        let td = TrustDomain::new("spiffe://Example.org").unwrap();
        assert_eq!(td.name(), "example.org");
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert!(id.is_member_of(&td));
        assert_eq!(td.id_with_path("ns/x").unwrap(), id);
        assert!(matches!(
            TrustDomain::new("spiffe://example.org/x"),
            Err(IdError::NotATrustDomain(_))
        ));
        assert!(TrustDomain::new("").is_err());
    }

    #[test]
    fn serde_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://example.org/a\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://example.org/a\""
        );
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://example.org/a/\"").is_err());
    }
}
