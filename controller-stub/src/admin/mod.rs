//! The controller's admin interface: HTTP/1.1 with JSON bodies over a Unix
//! socket (`http`), and the routes that map requests onto the controller
//! (`routes`). `docs/operations.md` documents every route.

pub mod exports;
pub mod http;
pub mod revocations;
pub mod routes;
