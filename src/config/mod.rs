//! Configuration: TOML files whose keys match the command-line flags
//! (`ca_ttl = "24h"` ↔ `--ca-ttl 24h`), flags winning. Everything is
//! validated before the runtime starts; errors name the key and the value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spiffe::TrustDomain;

/// Why configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message (names the key and line).
        reason: String,
    },
    /// A key has a bad value.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        /// The key (same name as the flag, with `_`).
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// A required key is missing.
    #[error("{key} is required (flag --{flag} or config key {key})")]
    Missing {
        /// The key.
        key: &'static str,
        /// The flag spelling.
        flag: String,
    },
}

/// Parses `90s`, `10m`, `1h`, `2d` or sums such as `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration (use e.g. 90s, 10m, 1h)".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("unknown unit {c:?} (use s, m, h or d)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("a number must come before {c:?}"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or("duration is too large")?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("{digits:?} has no unit (use e.g. {digits}s)"));
    }
    if total > MAX_DURATION.as_secs() {
        return Err(format!(
            "{s} is too long (at most {}d)",
            MAX_DURATION.as_secs() / 86_400
        ));
    }
    Ok(Duration::from_secs(total))
}

/// The longest duration accepted anywhere (100 years): far past any sane TTL,
/// and well inside what clock arithmetic can hold.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Values from the command line and a config file, before validation.
/// Keys are the snake_case flag names.
#[derive(Debug, Default)]
pub struct RawConfig {
    flags: BTreeMap<&'static str, String>,
    file: BTreeMap<String, toml::Value>,
}

impl RawConfig {
    /// Reads `path` (if given) and checks every key is one of `known`.
    pub fn load(path: Option<&Path>, known: &[&str]) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::default();
        let Some(path) = path else {
            return Ok(raw);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        for (key, value) in table {
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    reason: format!("unknown key {key:?} (known keys: {})", known.join(", ")),
                });
            }
            raw.file.insert(key, value);
        }
        Ok(raw)
    }

    /// The config file's array of tables under `key` (`[[key]]`); none when
    /// absent. Tables have no command-line form.
    pub fn tables(&self, key: &'static str) -> Result<Vec<toml::Value>, ConfigError> {
        match self.file.get(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) if items.iter().all(toml::Value::is_table) => {
                Ok(items.clone())
            }
            Some(other) => Err(ConfigError::Invalid {
                key,
                value: other.to_string(),
                reason: format!("expected [[{key}]] tables"),
            }),
        }
    }

    /// Records a flag given on the command line (flags win over the file).
    pub fn flag(&mut self, key: &'static str, value: Option<String>) {
        if let Some(v) = value {
            self.flags.insert(key, v);
        }
    }

    /// The value of `key` as a string: flag, else file, else none.
    pub fn get(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        if let Some(v) = self.flags.get(key) {
            return Ok(Some(v.clone()));
        }
        match self.file.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(toml::Value::Integer(i)) => Ok(Some(i.to_string())),
            Some(toml::Value::Boolean(b)) => Ok(Some(b.to_string())),
            // A list of strings (e.g. `server = ["a:8081", "b:8081"]`): read
            // back with [`RawConfig::list`].
            Some(toml::Value::Array(items)) if items.iter().all(toml::Value::is_str) => Ok(Some(
                items
                    .iter()
                    .filter_map(toml::Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
            )),
            Some(other) => Err(ConfigError::Invalid {
                key,
                value: other.to_string(),
                reason: "expected a string".into(),
            }),
        }
    }

    /// A required list: a TOML array of strings, or comma-separated values
    /// (a repeated flag gives one each). Empty items are refused.
    pub fn list(&self, key: &'static str) -> Result<Vec<String>, ConfigError> {
        let value = self.required(key)?;
        let items: Vec<String> = value.split(',').map(|v| v.trim().to_string()).collect();
        if items.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid {
                key,
                value,
                reason: "an item of the list is empty".into(),
            });
        }
        Ok(items)
    }

    /// A required string.
    pub fn required(&self, key: &'static str) -> Result<String, ConfigError> {
        self.get(key)?.ok_or_else(|| ConfigError::Missing {
            key,
            flag: key.replace('_', "-"),
        })
    }

    /// A string with a default.
    pub fn string_or(&self, key: &'static str, default: &str) -> Result<String, ConfigError> {
        Ok(self.get(key)?.unwrap_or_else(|| default.to_string()))
    }

    /// A value parsed by `parse`, with a default; errors name the key and value.
    pub fn parsed<T>(
        &self,
        key: &'static str,
        default: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(value) = self.get(key)?.or(default.map(str::to_string)) else {
            return Ok(None);
        };
        parse(&value)
            .map(Some)
            .map_err(|reason| ConfigError::Invalid { key, value, reason })
    }

    /// A positive duration with a default.
    pub fn duration(&self, key: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let d = self.parsed(key, Some(default), |v| {
            let d = parse_duration(v)?;
            if d.is_zero() {
                return Err("must be greater than zero".into());
            }
            Ok(d)
        })?;
        Ok(d.unwrap_or_default())
    }

    /// A socket address with a default.
    pub fn socket_addr(&self, key: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
        let addr = self.parsed(key, Some(default), |v| {
            v.parse::<SocketAddr>()
                .map_err(|e| format!("{e} (expected IP:PORT, e.g. 127.0.0.1:8081)"))
        })?;
        // A default is always present, so `parsed` returned Some.
        Ok(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))))
    }

    /// A trust domain.
    pub fn trust_domain(&self, key: &'static str) -> Result<TrustDomain, ConfigError> {
        let value = self.required(key)?;
        TrustDomain::new(&value).map_err(|e| ConfigError::Invalid {
            key,
            value,
            reason: e.to_string(),
        })
    }
}

/// `text` or `json` log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("90s", 90),
            ("10m", 600),
            ("1h", 3600),
            ("1h30m", 5400),
            ("2d", 172_800),
        ] {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_secs(secs), "{s}");
            assert_eq!(
                parse_duration(&format_duration(Duration::from_secs(secs)))
                    .unwrap()
                    .as_secs(),
                secs
            );
        }
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("2562047788015215h")
                .unwrap_err()
                .contains("too long")
        );
        assert!(
            parse_duration("36501d")
                .unwrap_err()
                .contains("at most 36500d")
        );
        assert!(parse_duration("36500d").is_ok());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn flags_win_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "ca_ttl = \"2h\"\ntrust_domain = \"example.org\"\n").unwrap();
        let mut raw = RawConfig::load(Some(&path), &["ca_ttl", "trust_domain"]).unwrap();
        assert_eq!(
            raw.duration("ca_ttl", "24h").unwrap(),
            Duration::from_secs(7200)
        );
        raw.flag("ca_ttl", Some("3h".into()));
        assert_eq!(
            raw.duration("ca_ttl", "24h").unwrap(),
            Duration::from_secs(10_800)
        );
        raw.flag("ca_ttl", Some("3x".into()));
        let err = raw.duration("ca_ttl", "24h").unwrap_err().to_string();
        assert!(err.starts_with("ca_ttl = \"3x\""), "{err}");

        std::fs::write(&path, "ca_tll = \"2h\"\n").unwrap();
        let err = RawConfig::load(Some(&path), &["ca_ttl"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key \"ca_tll\""), "{err}");

        let raw = RawConfig::default();
        let err = raw.trust_domain("trust_domain").unwrap_err().to_string();
        assert!(err.contains("--trust-domain"), "{err}");
    }
}
