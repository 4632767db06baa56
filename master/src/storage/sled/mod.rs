//! The embedded backend: every domain in one sled database under `<data_dir>/db`.
//!
//! sled is synchronous: small point reads and writes run directly (microseconds, page cache);
//! durability comes from `flush_async`, so no caller blocks a thread on the disk. Writes that
//! must be atomic together (a record and its unique index) are sled transactions over the trees
//! involved.
mod audit;
mod builds;
mod catalog;
mod schedules;

pub use audit::SledAudit;
pub use builds::Store;
pub use catalog::SledCatalog;
pub use schedules::SledSchedules;

/// `i64` as 8 bytes that sort like the number (sign bit flipped), for time keys.
fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn i64_from_ordered(b: &[u8]) -> Option<i64> {
    let raw = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    Some((raw ^ (1 << 63)) as i64)
}

/// Appends a length-prefixed string, so no part of a key runs into the next.
fn push_part(key: &mut Vec<u8>, part: &str) {
    key.extend_from_slice(&(part.len() as u32).to_be_bytes());
    key.extend_from_slice(part.as_bytes());
}

/// Reads a length-prefixed string at the start of `b`: (the string, the rest).
fn take_part(b: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(b.get(4..4 + len)?).ok()?;
    Some((s.to_string(), &b[4 + len..]))
}

/// A transaction's storage error as the master's (the stores never abort a transaction: a
/// refusal is a value the closure returns).
fn tx_error(
    e: sled::transaction::TransactionError<std::convert::Infallible>,
) -> crate::error::MasterError {
    match e {
        sled::transaction::TransactionError::Abort(never) => match never {},
        sled::transaction::TransactionError::Storage(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_keys_sort_like_their_numbers() {
        let mut v = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        let mut keys: Vec<_> = v.iter().map(|&n| ordered_i64(n)).collect();
        keys.sort();
        v.sort();
        let back: Vec<_> = keys.iter().map(|k| i64_from_ordered(k).unwrap()).collect();
        assert_eq!(back, v);
    }

    #[test]
    fn parts_round_trip_and_never_run_together() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        push_part(&mut a, "ab");
        push_part(&mut a, "c");
        push_part(&mut b, "a");
        push_part(&mut b, "bc");
        assert_ne!(a, b);
        let (first, rest) = take_part(&a).unwrap();
        assert_eq!(first, "ab");
        assert_eq!(take_part(rest).unwrap().0, "c");
        assert!(take_part(&[0, 0, 0, 9, b'x']).is_none());
    }
}
