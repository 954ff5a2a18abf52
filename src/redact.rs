//! Credentials out of printed URLs: `scheme://user:password@host/…` prints as
//! `scheme://[redacted]@host/…`.
//!
//! Any configured URL may carry userinfo (an MCP server behind basic auth, a proxy in front of
//! an OAuth endpoint), and URLs reach text in many ways: `config check`, log lines, and the
//! `Display` of HTTP errors, which names the URL it failed on. Redacting the text at the point
//! where it is printed covers them all, whatever produced the URL.

use std::borrow::Cow;

/// What userinfo is replaced with.
const REDACTED: &str = "[redacted]";

/// `text` with the userinfo of every URL in it replaced by `[redacted]`; borrowed when there was
/// none.
pub fn credentials(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        let authority_len = rest[authority_start..]
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '`' | ')') || c.is_whitespace())
            .unwrap_or(rest.len() - authority_start);
        let authority = &rest[authority_start..authority_start + authority_len];
        out.push_str(&rest[..authority_start]);
        // The host follows the last `@`: a password may itself hold an unescaped one.
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
                changed = true;
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_start + authority_len..];
    }
    if !changed {
        return Cow::Borrowed(text);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::credentials;

    #[test]
    fn userinfo_is_redacted_and_the_rest_of_the_url_kept() {
        assert_eq!(
            credentials("http://user:hunter2@mcp.example:8080/mcp?x=1"),
            "http://[redacted]@mcp.example:8080/mcp?x=1"
        );
        assert_eq!(credentials("https://token@host"), "https://[redacted]@host");
        assert_eq!(credentials("http://u:p@ss@host/"), "http://[redacted]@host/");
    }

    #[test]
    fn every_url_in_a_text_is_redacted_and_a_text_without_credentials_is_untouched() {
        let text = "url: \"http://a:b@one/x\", error sending request for url (https://c:d@two/y): refused";
        assert_eq!(
            credentials(text),
            "url: \"http://[redacted]@one/x\", error sending request for url (https://[redacted]@two/y): refused"
        );
        let plain = "http://host/path?next=mailto:a@b and user@example.com";
        assert!(matches!(credentials(plain), std::borrow::Cow::Borrowed(_)));
        assert_eq!(credentials("no url here"), "no url here");
    }
}
