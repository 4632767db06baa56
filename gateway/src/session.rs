//! The gateway's session: one random id per gateway process, sent as `Session-Id` on every
//! response of every API (a layer, see `layers.rs`), so a client sees when it talks to another
//! gateway process (ClusterRunner clients use it to notice a restart).
use rand::Rng;

/// Response header naming this gateway's session.
pub const SESSION_HEADER: &str = "Session-Id";

/// A random UUID4 in its canonical text form: the session id of one gateway.
pub fn new_session_id() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_uuid4() {
        let s = new_session_id();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!("89ab".contains(&s[19..20]));
        assert_ne!(s, new_session_id());
    }
}
