//! The harness's integration tests, one module an area.

mod native;
