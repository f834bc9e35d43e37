//! Kubernetes: node attestation with projected service-account tokens, and (in `controller`)
//! the identity controller that keeps one registration entry per selected pod, and (in
//! `services`) the service controller that keeps the mesh services from Services and
//! EndpointSlices, and (in `egress`) the controller that keeps external services from
//! `ExternalService` resources.

pub mod bundle_cm;
pub mod controller;
pub mod crd;
pub mod egress;
pub mod gateway;
pub mod gateway_controller;
pub mod gateways;
pub mod http;
pub mod owned;
pub mod psat;
pub mod routes;
pub mod services;
pub mod template;
