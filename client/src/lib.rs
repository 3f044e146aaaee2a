//! placeholder
pub mod data;
pub mod store;
pub mod train;
pub mod transport;
