//! The OAuth providers whose tokens this service holds.
//!
//! Today that is Qlik Cloud alone. The name appears in config (`auth.provider`), in replies
//! (`error.provider`) and in the token collection's name (`qlik_tokens`), so it is one enum rather
//! than free strings.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Qlik,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Qlik => "qlik",
        }
    }

    /// The MongoDB collection holding this provider's tokens, one document per user.
    pub(crate) fn token_collection(self) -> &'static str {
        match self {
            Provider::Qlik => "qlik_tokens",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
