//! HTTP ingress proxy (in progress).
