//! The reference Tideline controller: accepts agents over mutual TLS, runs
//! sync sessions with them, and keeps their recovery points in a store.

pub mod admin;
pub mod config;
pub mod failback;
pub mod link;
pub mod pki;
pub mod plan;
pub mod registry;
pub mod revocation;
pub mod scheduler;
pub mod serve;
pub mod service;
pub mod session;
pub mod store;
pub mod tls;
