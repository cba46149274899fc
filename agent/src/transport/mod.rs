//! Transport: the TLS control channel to the controller.

pub mod connection;
pub mod throttle;
pub mod tls;
