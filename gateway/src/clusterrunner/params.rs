//! Query parameters: parsing, v2 pagination (spec §1.5), console paging and eventlog filters.
//! Bad values are 400s with a JSON error (ClusterRunner answered some of them with 500).
use crate::error::ApiError;

/// Default page size of v2 lists.
pub const DEFAULT_LIMIT: u32 = 20;
/// Largest page size of v2 lists (`pagination_max_limit`).
pub const MAX_LIMIT: u32 = 200;
/// Default `max_lines` of the console route.
pub const DEFAULT_MAX_LINES: u32 = 50;

/// The decoded query string of a request.
#[derive(Debug, Clone, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses a query string; an undecodable one counts as empty.
    pub fn parse(q: Option<&str>) -> Self {
        Self(
            q.and_then(|q| serde_urlencoded::from_str(q).ok())
                .unwrap_or_default(),
        )
    }

    /// The last value of `name` (Tornado's `get_query_argument`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                parse_int(v).ok_or_else(|| {
                    ApiError::BadRequest(format!("{name} must be an integer, got \"{v}\"."))
                })
            })
            .transpose()
    }

    /// v2 pagination: `(offset, limit)`; negative values clamp to 0, `limit` is capped at 200.
    pub fn page(&self) -> Result<(u32, u32), ApiError> {
        let clamp = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        let offset = self.int("offset")?.map_or(0, clamp);
        let limit = self
            .int("limit")?
            .map_or(DEFAULT_LIMIT, clamp)
            .min(MAX_LIMIT);
        Ok((offset, limit))
    }

    /// Console paging: `(max_lines, offset_line)`; `max_lines` must be > 0 and `offset_line`
    /// ≥ 0.
    pub fn console(&self) -> Result<(u32, Option<u64>), ApiError> {
        let max_lines = match self.int("max_lines")? {
            None => DEFAULT_MAX_LINES,
            Some(n) if n <= 0 => {
                return Err(ApiError::BadRequest(format!(
                    "max_lines must be greater than 0, got {n}."
                )));
            }
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        };
        let offset_line = match self.int("offset_line")? {
            Some(n) if n < 0 => {
                return Err(ApiError::BadRequest(format!(
                    "offset_line must not be negative, got {n}."
                )));
            }
            other => other.map(|n| n.unsigned_abs()),
        };
        Ok((max_lines, offset_line))
    }

    /// Eventlog filters: `(since_id, since_timestamp)`, at most one of them.
    pub fn events(&self) -> Result<(Option<u64>, Option<f64>), ApiError> {
        let since_id = self.int("since_id")?.map(|n| n.max(0).unsigned_abs());
        let since_timestamp = self
            .get("since_timestamp")
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| !f.is_nan())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "since_timestamp must be a number, got \"{v}\"."
                        ))
                    })
            })
            .transpose()?;
        if since_id.is_some() && since_timestamp.is_some() {
            return Err(ApiError::BadRequest(
                "Give since_timestamp or since_id, not both.".into(),
            ));
        }
        Ok((since_id, since_timestamp))
    }
}

/// Python's `int()` on a query argument: optional sign and digits, surrounding whitespace allowed;
/// values beyond i64 saturate (they only ever clamp).
fn parse_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(t.parse().unwrap_or(if t.starts_with('-') {
        i64::MIN
    } else {
        i64::MAX
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Query {
        Query::parse(Some(s))
    }

    #[test]
    fn pagination() {
        assert_eq!(q("").page().unwrap(), (0, 20));
        assert_eq!(q("offset=5&limit=7").page().unwrap(), (5, 7));
        assert_eq!(q("limit=1000").page().unwrap(), (0, 200));
        assert_eq!(q("offset=-3&limit=-1").page().unwrap(), (0, 0));
        assert_eq!(q("offset=+2&limit=%2010%20").page().unwrap(), (2, 10));
        assert_eq!(
            q("offset=99999999999999999999999").page().unwrap(),
            (u32::MAX, 20)
        );
        assert_eq!(q("limit=3&limit=4").page().unwrap(), (0, 4));
        for bad in ["offset=abc", "limit=1.5", "limit=", "offset=1e3"] {
            let e = q(bad).page().unwrap_err();
            assert_eq!(e.status().as_u16(), 400, "{bad}");
        }
    }

    #[test]
    fn console_params() {
        assert_eq!(q("").console().unwrap(), (50, None));
        assert_eq!(
            q("max_lines=5&offset_line=0").console().unwrap(),
            (5, Some(0))
        );
        for bad in [
            "max_lines=0",
            "max_lines=-1",
            "offset_line=-1",
            "max_lines=x",
            "offset_line=1.0",
        ] {
            assert_eq!(
                q(bad).console().unwrap_err().status().as_u16(),
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn eventlog_params() {
        assert_eq!(q("").events().unwrap(), (None, None));
        assert_eq!(q("since_id=4").events().unwrap(), (Some(4), None));
        assert_eq!(
            q("since_timestamp=12.5").events().unwrap(),
            (None, Some(12.5))
        );
        assert!(q("since_id=1&since_timestamp=2").events().is_err());
        assert!(q("since_timestamp=soon").events().is_err());
        assert!(q("since_id=x").events().is_err());
    }
}
