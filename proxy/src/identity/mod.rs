//! This workload's identity and the mTLS between proxies: a private key that never
//! leaves memory, certificates from the control plane renewed before they expire,
//! trust anchors, and the rustls configurations that verify every peer's identity.

mod anchors;
mod certify;
mod creds;
pub mod tls;

pub use anchors::{AnchorsError, TrustAnchors};
pub use certify::follow;
pub use creds::{Credentials, CredsError};
pub use strait_api::identity::{Identity, IdentityError};
