//! `pdgate demo`: a customer-data service of the kind pdgate protects, the sidecar in front of
//! it on embedded defaults, and a scripted walkthrough through a real gRPC client.

pub mod customer;
pub mod walkthrough;
