//! Workload identity: SPIFFE IDs and X.509-SVIDs (issue and verify).
