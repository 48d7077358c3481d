//! What travels on an `ENRL` connection: how an agent obtains its certificate.
//!
//! The agent's private key never leaves its host: it sends a certificate signing
//! request and gets back a certificate the server's CA signed.
//!
//! * **Enrollment** (a host with no certificate yet): the TLS handshake carries no
//!   client certificate. The server first sends its CA certificate
//!   ([`EnrollReply::Authority`]); the agent checks it against the pin it was given
//!   out of band and that the server's own certificate chains to it *before* it sends
//!   anything secret, then sends [`EnrollRequest::Enroll`] with the one-time token.
//! * **Renewal** (an agent whose certificate nears its end): the handshake is mutual
//!   TLS as on every other connection, and [`EnrollRequest::Renew`] carries only the
//!   new CSR. The identity comes from the certificate presented, never from the
//!   request.
//!
//! One request per connection; the answer is [`EnrollReply::Issued`] or a `Refused`
//! frame (`not allowed` for a bad token or an unknown name, `unsupported` when the
//! server does not sign enrollments).

use serde::{Deserialize, Serialize};

use crate::Name;

/// Prefix of every enrollment token, so a leaked one is recognisable in a log or a
/// paste (and secret scanners can be taught it).
pub const TOKEN_PREFIX: &str = "nbk1-";

/// Random bytes in a token (hex-encoded after the prefix).
pub const TOKEN_BYTES: usize = 32;

/// Client → server, the only request of an `ENRL` connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnrollRequest {
    /// First enrollment: a token minted for `agent` by `nbackup cert token`.
    Enroll { agent: Name, token: String, csr: String },
    /// A fresh certificate for the identity of the certificate this connection was
    /// authenticated with, for the key in `csr`.
    Renew { csr: String },
}

/// Server → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum EnrollReply {
    /// The first frame on every `ENRL` connection: the CA certificate (PEM) that signs
    /// this server's and its agents' certificates.
    Authority { ca: String },
    /// The signed certificate (PEM) and when it stops being valid (RFC 3339).
    Issued { cert: String, not_after: String },
}

/// A CA pin as printed by `nbackup cert token`: `sha256:` and the SHA-256 of the CA
/// certificate's DER, in hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPin(pub [u8; 32]);

impl CaPin {
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{text:?} is not a CA pin; it starts with \"sha256:\""))?;
        let bytes = crate::manifest::unhex(hex)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("{text:?} is not a CA pin; \"sha256:\" is followed by 64 hexadecimal digits"))?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(CaPin(out))
    }
}

impl std::fmt::Display for CaPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Whether `token` has the shape of an enrollment token (prefix and 64 hex digits),
/// so a truncated paste is reported as such rather than as a refusal.
pub fn token_is_well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).and_then(crate::manifest::unhex).is_some_and(|b| b.len() == TOKEN_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_bad_ones_say_what_is_wrong() {
        let pin = CaPin([0xab; 32]);
        let text = pin.to_string();
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(CaPin::parse(&text), Ok(pin));
        assert!(CaPin::parse(&text.to_uppercase().replace("SHA256", "sha256")).is_ok(), "hex case is free");
        assert!(CaPin::parse(&text[7..]).unwrap_err().contains("starts with"));
        assert!(CaPin::parse(&text[..40]).unwrap_err().contains("64 hexadecimal"));
        assert!(CaPin::parse("sha256:zz").is_err());
    }

    #[test]
    fn tokens_are_checked_for_shape() {
        let good = format!("{TOKEN_PREFIX}{}", "0f".repeat(TOKEN_BYTES));
        assert!(token_is_well_formed(&good));
        assert!(!token_is_well_formed(&good[..good.len() - 1]));
        assert!(!token_is_well_formed(&good[TOKEN_PREFIX.len()..]));
        assert!(!token_is_well_formed(&format!("{TOKEN_PREFIX}{}", "é".repeat(TOKEN_BYTES))));
    }

    #[test]
    fn requests_are_tagged_and_strict() {
        let r: EnrollRequest = serde_json::from_str(r#"{"op":"renew","csr":"x"}"#).expect("parses");
        assert_eq!(r, EnrollRequest::Renew { csr: "x".into() });
        assert!(serde_json::from_str::<EnrollRequest>(r#"{"op":"renew","csr":"x","agent":"a"}"#).is_err());
        let e: EnrollRequest =
            serde_json::from_str(r#"{"op":"enroll","agent":"web-02","token":"t","csr":"c"}"#).expect("parses");
        assert!(matches!(e, EnrollRequest::Enroll { agent, .. } if agent.as_str() == "web-02"));
        assert!(
            serde_json::from_str::<EnrollRequest>(r#"{"op":"enroll","agent":"../x","token":"t","csr":"c"}"#).is_err()
        );
    }
}
