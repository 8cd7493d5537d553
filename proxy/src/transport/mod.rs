//! Accepting connections: listeners with a connection cap, the original destination
//! of redirected connections, replaying bytes read during detection, and draining.

pub mod coalesce;
pub mod connect;
pub mod drain;
pub mod first_word;
pub mod listen;
pub mod orig_dst;
pub mod prefixed;

pub use drain::{Drain, DrainTrigger};
pub use listen::{Accepted, Listener};
pub use prefixed::PrefixedIo;
