//! Image formats (qcow2, raw): header parsing, cluster mapping, allocation.
