//! A tag's token: what a tag's key holds, and what an entry of the tag is
//! stored with (see [`crate::tag`]). Fixed-size and `Copy`: a tagged hit
//! compares and keeps tokens without allocating.

/// How many bytes a token has: 16 hexadecimal digits.
const LEN: usize = 16;

/// A tag's token, as [`Token::random`] makes it; anything else under a
/// tag's key is not ours, and could not be written in an entry's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token([u8; LEN]);

impl Token {
    /// A new token: 64 random bits in hexadecimal.
    pub(crate) fn random() -> Token {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut bits = fastrand::u64(..);
        let mut token = [0; LEN];
        for digit in token.iter_mut().rev() {
            *digit = DIGITS[(bits & 0xf) as usize];
            bits >>= 4;
        }
        Token(token)
    }

    /// `bytes` as a token, if they are one.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Token> {
        let token: [u8; LEN] = bytes.try_into().ok()?;
        token
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(Token(token))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Whether `bytes` are a token.
pub(crate) fn is_token(bytes: &[u8]) -> bool {
    Token::parse(bytes).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_sixteen_hexadecimal_digits() {
        let token = Token::random();
        assert_eq!(Token::parse(token.as_bytes()), Some(token));
        assert_ne!(Token::random(), token);
        assert_eq!(
            Token::parse(b"00ff00ff00ff00fF").map(|t| t.0),
            Some(*b"00ff00ff00ff00fF")
        );
        assert_eq!(Token::parse(b"00ff00ff00ff00f"), None, "short");
        assert_eq!(Token::parse(b"00ff00ff00ff00ff0"), None, "long");
        assert_eq!(Token::parse(b"00ff00ff00ff00fg"), None, "not hexadecimal");
    }
}
